"""Evaluation: decoding, sacreBLEU metrics per direction, and reports."""
