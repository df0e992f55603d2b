"""Language codes -> English names, from Babel's CLDR data.

Accepted forms (case-insensitive, ``-`` or ``_`` as separator):

* ISO 639-1 ``de``; ISO 639-3 ``deu`` (mapped to 639-1 where one exists, via
  CLDR's language aliases plus a few FLORES-200 individual languages below);
* FLORES-200 ``deu_Latn``: the script is shown only where it is not the
  language's usual one (``kas_Deva`` -> "Kashmiri (Devanagari)") or the
  language is routinely written in two scripts (``zho_Hant`` -> "Chinese
  (Traditional)", ``zho_Hans`` -> "Chinese (Simplified)");
* BCP-47 ``zh-Hant``, ``pt-BR`` -> "Portuguese (Brazil)".

The names feed prompt templates (``{src_name}``), so they must be stable:
they come from CLDR's English display names and nothing else.
"""

from __future__ import annotations

import functools
import re

from babel import Locale
from babel.core import get_global


class UnknownLanguageError(ValueError):
    """A language code that CLDR (and our small table) does not know."""


# ISO 639-3 individual languages used by FLORES-200 whose CLDR name lives
# under another code (or that CLDR has no alias for).
_EXTRA_ALIASES = {
    "pbt": "ps",  # Southern Pashto
    "quy": "qu",  # Ayacucho Quechua
    "knc": "kr",  # Central Kanuri
    "fil": "fil",
    "prs": "fa_AF",  # Dari
    "ltg": "ltg",
}

# FLORES-200 languages CLDR has no English name for: code -> (name, usual script).
_EXTRA_NAMES = {
    "acm": ("Mesopotamian Arabic", "Arab"),
    "acq": ("Ta'izzi-Adeni Arabic", "Arab"),
    "ajp": ("South Levantine Arabic", "Arab"),
    "apc": ("North Levantine Arabic", "Arab"),
    "azb": ("South Azerbaijani", "Arab"),
    "cjk": ("Chokwe", "Latn"),
    "fuv": ("Nigerian Fulfulde", "Latn"),
    "hne": ("Chhattisgarhi", "Deva"),
    "kbp": ("Kabiye", "Latn"),
    "taq": ("Tamasheq", None),  # Latn and Tfng both in FLORES-200: always named
}

# Languages whose script is always named, because two scripts are common.
_ALWAYS_SHOW_SCRIPT = {"zh", "sr"}
# Scripts CLDR's likely-subtags data spells differently from FLORES-200.
_SAME_SCRIPT = {("ko", "Hang"), ("ja", "Hira"), ("ja", "Kana")}

_CODE_RE = re.compile(
    r"^(?P<lang>[a-z]{2,3})"
    r"(?:_(?P<script>[a-z]{4}))?"
    r"(?:_(?P<region>[a-z]{2}|\d{3}))?$"
)


@functools.cache
def _english() -> Locale:
    return Locale("en")


def _canonical_language(lang: str) -> tuple[str, str | None]:
    """639-3 / deprecated code -> (CLDR language code, region implied by alias)."""
    names = _english().languages
    if lang in names:
        return lang, None
    alias = _EXTRA_ALIASES.get(lang) or get_global("language_aliases").get(lang)
    if alias is None:
        return lang, None
    base, _, region = alias.partition("_")
    return base, region or None


def _usual_script(lang: str) -> str | None:
    if lang in _EXTRA_NAMES:
        return _EXTRA_NAMES[lang][1]
    likely = get_global("likely_subtags").get(lang)
    if not likely:
        return None
    parts = likely.split("_")
    return parts[1] if len(parts) > 1 and len(parts[1]) == 4 else None


@functools.cache
def language_name(code: str) -> str:
    """English name of a language code; raises ``UnknownLanguageError``."""
    m = _CODE_RE.match(code.strip().replace("-", "_").lower()) if isinstance(code, str) else None
    if m is None:
        raise UnknownLanguageError(f"unknown language code {code!r}")
    lang, implied_region = _canonical_language(m["lang"])
    en = _english()
    name = en.languages.get(lang) or _EXTRA_NAMES.get(lang, (None,))[0]
    if name is None:
        raise UnknownLanguageError(f"unknown language code {code!r}")

    details = []
    script = m["script"].title() if m["script"] else None
    if script is not None:
        script_name = en.scripts.get(script)
        if script_name is None:
            raise UnknownLanguageError(f"unknown script {script!r} in language code {code!r}")
        usual = script == _usual_script(lang) or (lang, script) in _SAME_SCRIPT
        if lang in _ALWAYS_SHOW_SCRIPT or not usual:
            details.append(script_name)
    region = m["region"].upper() if m["region"] else implied_region
    if region is not None:
        region_name = en.territories.get(region)
        if region_name is None:
            raise UnknownLanguageError(f"unknown region {region!r} in language code {code!r}")
        if implied_region is not None and not m["region"]:
            # e.g. prs -> fa_AF: CLDR names the pair ("Dari") directly.
            name = en.languages.get(f"{lang}_{region}", name)
        else:
            details.append(region_name)
    return f"{name} ({', '.join(details)})" if details else name
