"""Offline demo assets (a small multilingual parallel corpus built from CLDR/num2words data)."""
