"""Offline multi-way parallel demo corpus built from CLDR (Babel) and num2words data.

Every line is rendered independently in each language from the *same* abstract
specification (a date, an amount of money, a list of countries, ...), using only
locale data shipped with ``babel`` (CLDR) and ``num2words``. No hand-written
translations are involved, so line ``i`` of every ``{split}.{flores_code}`` file
expresses the same content. English renderings are de-duplicated globally, so no
dev/test line's English side appears in train.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import babel
from babel import Locale
from babel.dates import format_date, format_interval, format_time, format_timedelta, get_datetime_format
from babel.numbers import (format_currency, format_decimal, get_currency_name, get_currency_precision,
                           get_currency_unit_pattern)
from babel.units import format_compound_unit
from num2words import num2words

__all__ = ["DEMO_LANGUAGES", "GENERATORS", "build_corpus", "render"]

FORMAT_VERSION = 1

#: FLORES-200 code -> locale understood by both Babel and num2words.
DEMO_LANGUAGES: dict[str, str] = {
    "eng_Latn": "en",
    "deu_Latn": "de",
    "fra_Latn": "fr",
    "spa_Latn": "es",
    "rus_Cyrl": "ru",
    "ukr_Cyrl": "uk",
    "arb_Arab": "ar",
    "heb_Hebr": "he",
    "jpn_Jpan": "ja",
    "kor_Hang": "ko",
    "tha_Thai": "th",
}

_TERRITORIES = ("AR", "AU", "BR", "CA", "CH", "CN", "DE", "EG", "ES", "FI", "FR", "GB", "GR", "IE", "IL",
                "IN", "IT", "JP", "KE", "KR", "MA", "MX", "NG", "NL", "NO", "NZ", "PE", "PL", "PT", "RU",
                "SA", "SE", "TH", "TR", "UA", "US", "VN", "ZA")
_LOCALE_NAMES = ("fr_CA", "en_GB", "en_US", "en_AU", "pt_BR", "pt_PT", "es_MX", "es_AR", "de_AT", "de_CH",
                 "fr_BE", "nl_BE", "it_CH", "ar_EG", "ar_MA", "zh", "ja", "ko", "hi", "sw", "tr", "pl",
                 "sv", "fi", "el", "he", "th", "vi", "id", "uk", "ru", "cs", "hu", "ro", "da", "nb")
_CURRENCIES = ("USD", "EUR", "JPY", "GBP", "CHF", "CNY", "INR", "KRW", "RUB", "BRL", "CAD", "AUD", "MXN")
_UNITS = ("length-kilometer", "length-meter", "length-centimeter", "mass-kilogram", "mass-gram",
          "volume-liter", "duration-hour", "duration-minute", "duration-day", "duration-week",
          "duration-month", "duration-year", "temperature-celsius", "area-hectare", "digital-gigabyte",
          "speed-kilometer-per-hour")
_WORD_UNITS = ("length-kilometer", "length-meter", "mass-kilogram", "volume-liter", "duration-hour",
               "duration-minute", "duration-day", "duration-week", "duration-year", "area-hectare")
_INTERVAL_SKELETONS = ("yMMMd", "yMMMEd", "MMMd", "yMMMM", "MMMEd")
_DURATION_SETS = (("duration-hour", "duration-minute"), ("duration-day", "duration-hour"),
                  ("duration-hour", "duration-minute", "duration-second"), ("duration-week", "duration-day"),
                  ("duration-year", "duration-month"), ("duration-minute", "duration-second"))
_SUB_MAX = {"duration-month": 11, "duration-day": 6, "duration-hour": 23, "duration-minute": 59,
            "duration-second": 59}
_SPACES = re.compile(r"\s+")
_DROP = dict.fromkeys(map(ord, "\u200e\u200f\u061c\u200b"), None)

Spec = tuple[str, tuple[Any, ...]]


@lru_cache(maxsize=None)
def _loc(code: str) -> Locale:
    return Locale.parse(code)


def _join(items: Sequence[str], style: str, loc: str) -> str:
    """CLDR list pattern join; falls back to the 'standard' pieces where Babel's data is partial."""
    locale = _loc(loc)
    pats = dict(locale.list_patterns["standard"])
    try:
        pats.update(locale.list_patterns[style])
    except KeyError:
        pass
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return pats.get("2", pats["end"]).format(items[0], items[1])
    out = pats["start"].format(items[0], items[1])
    for item in items[2:-1]:
        out = pats["middle"].format(out, item)
    return pats["end"].format(out, items[-1])


def _unit_pattern(unit: str, n: float, loc: str) -> str:
    """CLDR long unit pattern for the plural category of ``n`` (falling back to short, as CLDR does)."""
    data = _loc(loc)._data["unit_patterns"][unit]
    pats = {k: v for width in ("short", "long") for k, v in dict(data.get(width, {})).items() if k != "per"}
    return pats.get(_loc(loc).plural_form(n), pats["other"])


def _fmt_unit(value: float, unit: str, loc: str) -> str:
    """Digits inside the long unit pattern (Babel's own ``format_unit`` lacks the short fallback)."""
    return _unit_pattern(unit, value, loc).replace("{0}", format_decimal(value, locale=loc))


def _words_with_unit(n: int, unit: str, loc: str) -> str:
    """Spell ``n`` with num2words inside the CLDR long unit pattern of the matching plural form."""
    return _unit_pattern(unit, n, loc).replace("{0}", num2words(n, lang=loc))


def _date_time(p: tuple[Any, ...], loc: str) -> str:
    moment, width = p
    pattern = get_datetime_format(width, locale=loc).replace("'", "")
    time = format_time(moment, "short", locale=loc)
    return pattern.replace("{0}", time).replace("{1}", format_date(moment, "full", locale=loc))


def _date_interval(p: tuple[Any, ...], loc: str) -> str:
    start, end, skeleton = p
    return format_interval(start, end, skeleton, locale=loc)


def _relative_time(p: tuple[Any, ...], loc: str) -> str:
    seconds, granularity = p
    return format_timedelta(dt.timedelta(seconds=seconds), granularity=granularity, threshold=1.5,
                            add_direction=True, format="long", locale=loc)


def _duration(p: tuple[Any, ...], loc: str) -> str:
    return _join([_fmt_unit(v, u, loc) for u, v in p], "unit", loc)


def _measurement(p: tuple[Any, ...], loc: str) -> str:
    values, style = p
    parts = []
    for unit, v in values:
        if unit == "speed-kilometer-per-hour":
            parts.append(format_compound_unit(v, "length-kilometer", denominator_unit="duration-hour",
                                              length="long", locale=loc))
        else:
            parts.append(_fmt_unit(v, unit, loc))
    return _join(parts, style, loc)


def _price(p: tuple[Any, ...], loc: str) -> str:
    amounts, style, fmt = p
    return _join([format_currency(a, c, locale=loc, format_type=fmt) for c, a in amounts], style, loc)


def _spelled_amount(p: tuple[Any, ...], loc: str) -> str:
    n, currency = p
    pattern = get_currency_unit_pattern(currency, count=n, locale=loc)
    return pattern.format(num2words(n, lang=loc), get_currency_name(currency, count=n, locale=loc))


def _spelled_measure(p: tuple[Any, ...], loc: str) -> str:
    return _join([_words_with_unit(n, u, loc) for u, n in p], "unit", loc)


def _places(p: tuple[Any, ...], loc: str) -> str:
    codes, style = p
    return _join([_loc(loc).territories[c] for c in codes], style, loc)


def _language_names(p: tuple[Any, ...], loc: str) -> str:
    names, style = p
    return _join([_loc(n).get_display_name(loc) for n in names], style, loc)


def _years(p: tuple[Any, ...], loc: str) -> str:
    years, style = p
    return _join([num2words(y, lang=loc, to="year") for y in years], style, loc)


def _spellable(rng: random.Random, lo: int, hi: int) -> int:
    """A number whose spelled form needs no noun agreement (no '1'/'2' ending in units or thousands),
    which num2words does not do (e.g. Spanish 'veintiuno dólares', Russian 'два' for feminine nouns)."""
    while True:
        n = rng.randint(lo, hi)
        if all(g % 10 not in (1, 2) or g % 100 in range(11, 20) for g in (n % 1000, n // 1000) if g):
            return n


def _rand_date(rng: random.Random) -> dt.datetime:
    return dt.datetime(rng.randint(1950, 2040), rng.randint(1, 12), rng.randint(1, 28),
                       rng.randint(0, 23), rng.choice((0, 15, 30, 45)))


def _sample(name: str, rng: random.Random) -> tuple[Any, ...]:
    """Draw the abstract parameters of one example for generator ``name``."""
    style = rng.choice(("standard", "standard", "or"))
    if name == "date_time":
        return (_rand_date(rng), rng.choice(("full", "long", "medium")))
    if name == "date_interval":
        start = _rand_date(rng).date()
        return (start, start + dt.timedelta(days=rng.randint(1, 120)), rng.choice(_INTERVAL_SKELETONS))
    if name == "relative_time":
        scale = rng.choice((60, 3600, 86400, 7 * 86400, 30 * 86400, 365 * 86400))
        return (rng.choice((-1, 1)) * scale * rng.randint(1, 11), rng.choice(("second", "day")))
    if name == "duration":
        lead, *rest = rng.choice(_DURATION_SETS)
        return ((lead, rng.randint(1, 12)),) + tuple((u, rng.randint(1, _SUB_MAX[u])) for u in rest)
    if name == "measurement":
        units = rng.sample(_UNITS, rng.randint(1, 3))
        vals = tuple((u, rng.choice((rng.randint(1, 999), round(rng.uniform(0.1, 99), 1)))) for u in units)
        return (vals, style)
    if name == "price":
        amounts = []
        for cur in rng.sample(_CURRENCIES, rng.randint(1, 2)):
            digits = get_currency_precision(cur)
            amounts.append((cur, round(rng.uniform(0.5, 5000 if digits else 500000), digits)))
        return (tuple(amounts), style, rng.choice(("standard", "standard", "name")))
    if name == "spelled_amount":
        return (_spellable(rng, 3, rng.choice((100, 99999))), rng.choice(_CURRENCIES))
    if name == "spelled_measure":
        return ((rng.choice(_WORD_UNITS), _spellable(rng, 3, 999)),)
    if name == "places":
        return (tuple(rng.sample(_TERRITORIES, rng.randint(2, 4))), style)
    if name == "language_names":
        return (tuple(rng.sample(_LOCALE_NAMES, rng.randint(1, 3))), style)
    if name == "years":
        return (tuple(rng.sample(range(1870, 2026), rng.randint(1, 2))), style)
    raise KeyError(name)


#: Generator name -> renderer(params, locale) -> str.
GENERATORS: dict[str, Callable[[tuple[Any, ...], str], str]] = {
    "date_time": _date_time,
    "date_interval": _date_interval,
    "relative_time": _relative_time,
    "duration": _duration,
    "measurement": _measurement,
    "price": _price,
    "spelled_amount": _spelled_amount,
    "spelled_measure": _spelled_measure,
    "places": _places,
    "language_names": _language_names,
    "years": _years,
}


def _clean(text: str) -> str:
    """Drop bidi/zero-width marks, turn (narrow) no-break spaces into spaces, NFC-normalise."""
    text = text.translate(_DROP)
    text = _SPACES.sub(" ", text.replace("\u00a0", " ").replace("\u202f", " ")).strip()
    return unicodedata.normalize("NFC", text)


def render(spec: Spec, locale: str) -> str:
    """Render one abstract example ``(generator, params)`` in ``locale`` as a clean single line."""
    name, params = spec
    return _clean(GENERATORS[name](params, locale))


def _resolve(languages: Sequence[str] | None) -> list[str]:
    langs = list(DEMO_LANGUAGES) if languages is None else list(dict.fromkeys(languages))
    unknown = [lang for lang in langs if lang not in DEMO_LANGUAGES]
    if unknown or not langs:
        raise ValueError(f"unknown or empty languages {unknown}; choose from {sorted(DEMO_LANGUAGES)}")
    return langs


def _generate(n: int, seed: int, langs: list[str]) -> tuple[list[list[str]], dict[str, int]]:
    """Draw ``n`` examples whose English renderings are pairwise distinct; rows follow ``langs`` order."""
    rng = random.Random(seed)
    names = list(GENERATORS)
    seen: set[str] = set()
    rows: list[list[str]] = []
    used = dict.fromkeys(names, 0)
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could only generate {len(rows)} unique lines out of {n}")
        name = names[attempts % len(names)] if attempts % 3 else rng.choice(names)
        spec: Spec = (name, _sample(name, rng))
        try:
            key = render(spec, "en")
            if key in seen:
                continue
            row = [key if DEMO_LANGUAGES[lang] == "en" else render(spec, DEMO_LANGUAGES[lang]) for lang in langs]
        except (KeyError, ValueError, NotImplementedError, AttributeError):
            continue  # a locale lacks data for this spec: skip it everywhere to keep alignment
        if any(not line for line in row):
            continue
        seen.add(key)
        rows.append(row)
        used[name] += 1
    return rows, used


def build_corpus(out_dir: Path, *, seed: int = 0, n_train: int = 3000, n_dev: int = 200, n_test: int = 200,
                 languages: Sequence[str] | None = None) -> dict:
    """Write ``{train,dev,test}.{flores_code}`` plus ``MANIFEST.json`` into ``out_dir``; return the manifest.

    Idempotent: if a manifest with identical parameters (and library versions) exists and all files
    are present, it is returned without regenerating anything.
    """
    out_dir = Path(out_dir)
    langs = _resolve(languages)
    counts = {"train": int(n_train), "dev": int(n_dev), "test": int(n_test)}
    if min(counts.values()) < 0:
        raise ValueError(f"split sizes must be >= 0, got {counts}")
    params = {"seed": int(seed), "counts": counts, "languages": langs, "format_version": FORMAT_VERSION,
              "babel_version": babel.__version__, "num2words_version": version("num2words")}
    manifest_path = out_dir / "MANIFEST.json"
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get("params") == params and all(
                (out_dir / f"{s}.{lang}").is_file() for s in counts for lang in langs):
            return old
    rows, used = _generate(sum(counts.values()), int(seed), langs)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, n in counts.items():
        chunk = rows[start:start + n]
        start += n
        for j, lang in enumerate(langs):
            text = "".join(row[j] + "\n" for row in chunk)
            (out_dir / f"{split}.{lang}").write_text(text, encoding="utf-8", newline="\n")
    manifest = {
        "params": params,
        "seed": int(seed),
        "languages": {lang: DEMO_LANGUAGES[lang] for lang in langs},
        "scripts": {lang: lang.split("_", 1)[1] for lang in langs},
        "counts": counts,
        "generators": sorted(GENERATORS),
        "generator_counts": used,
        "babel_version": babel.__version__,
        "num2words_version": params["num2words_version"],
        "files": [f"{s}.{lang}" for s in counts for lang in langs],
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tmp.replace(manifest_path)
    return manifest

