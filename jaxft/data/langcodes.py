"""Language codes -> the language tokens of encoder-decoder vocabularies.

* ``flores_code("de") -> "deu_Latn"``: the FLORES-200 code, which is also the
  language token of NLLB-200 (``data.lang_code_style: flores``);
* ``mbart50_code("deu_Latn") -> "de_DE"``: the mBART-50 language token
  (``data.lang_code_style: mbart50``);
* ``t5_tag("de") -> "<2de>"``: the T5-style target tag, the code as written
  in the config (``data.lang_tokens: t5_tag``).

Accepted inputs: ISO 639-1 (``de``), ISO 639-3 (``deu``, also bibliographic
``ger`` and individual languages of a macrolanguage such as ``arb``, ``pes``,
``zsm``), FLORES-200 (``deu_Latn``) and BCP-47 (``zh-Hant``, ``pt-BR``),
case-insensitive, ``-`` or ``_`` as separator.  639-3 and 639-1 are related
through CLDR's language aliases (Babel).  Where a language has several
FLORES-200 codes and the input names no script, ``_FLORES_DEFAULT`` picks
one (``zh`` -> ``zho_Hans``, ``fa`` -> ``pes_Arab``).
"""

from __future__ import annotations

import functools
import re

from babel.core import get_global

FLORES200 = tuple("""
ace_Arab ace_Latn acm_Arab acq_Arab aeb_Arab afr_Latn ajp_Arab aka_Latn amh_Ethi apc_Arab arb_Arab
ars_Arab ary_Arab arz_Arab asm_Beng ast_Latn awa_Deva ayr_Latn azb_Arab azj_Latn bak_Cyrl bam_Latn
ban_Latn bel_Cyrl bem_Latn ben_Beng bho_Deva bjn_Arab bjn_Latn bod_Tibt bos_Latn bug_Latn bul_Cyrl
cat_Latn ceb_Latn ces_Latn cjk_Latn ckb_Arab crh_Latn cym_Latn dan_Latn deu_Latn dik_Latn dyu_Latn
dzo_Tibt ell_Grek eng_Latn epo_Latn est_Latn eus_Latn ewe_Latn fao_Latn pes_Arab fij_Latn fin_Latn
fon_Latn fra_Latn fur_Latn fuv_Latn gla_Latn gle_Latn glg_Latn grn_Latn guj_Gujr hat_Latn hau_Latn
heb_Hebr hin_Deva hne_Deva hrv_Latn hun_Latn hye_Armn ibo_Latn ilo_Latn ind_Latn isl_Latn ita_Latn
jav_Latn jpn_Jpan kab_Latn kac_Latn kam_Latn kan_Knda kas_Arab kas_Deva kat_Geor knc_Arab knc_Latn
kaz_Cyrl kbp_Latn kea_Latn khm_Khmr kik_Latn kin_Latn kir_Cyrl kmb_Latn kon_Latn kor_Hang kmr_Latn
lao_Laoo lvs_Latn lij_Latn lim_Latn lin_Latn lit_Latn lmo_Latn ltg_Latn ltz_Latn lua_Latn lug_Latn
luo_Latn lus_Latn mag_Deva mai_Deva mal_Mlym mar_Deva min_Latn mkd_Cyrl plt_Latn mlt_Latn mni_Beng
khk_Cyrl mos_Latn mri_Latn zsm_Latn mya_Mymr nld_Latn nno_Latn nob_Latn npi_Deva nso_Latn nus_Latn
nya_Latn oci_Latn gaz_Latn ory_Orya pag_Latn pan_Guru pap_Latn pol_Latn por_Latn prs_Arab pbt_Arab
quy_Latn ron_Latn run_Latn rus_Cyrl sag_Latn san_Deva sat_Beng scn_Latn shn_Mymr sin_Sinh slk_Latn
slv_Latn smo_Latn sna_Latn snd_Arab som_Latn sot_Latn spa_Latn als_Latn srd_Latn srp_Cyrl ssw_Latn
sun_Latn swe_Latn swh_Latn szl_Latn tam_Taml tat_Cyrl tel_Telu tgk_Cyrl tgl_Latn tha_Thai tir_Ethi
taq_Latn taq_Tfng tpi_Latn tsn_Latn tso_Latn tuk_Latn tum_Latn tur_Latn twi_Latn tzm_Tfng uig_Arab
ukr_Cyrl umb_Latn urd_Arab uzn_Latn vec_Latn vie_Latn war_Latn wol_Latn xho_Latn ydd_Hebr yor_Latn
yue_Hant zho_Hans zho_Hant zul_Latn
""".split())

# mBART-50's 52 language tokens (mbart-large-50 tokenizer order).
MBART50 = tuple("""
ar_AR cs_CZ de_DE en_XX es_XX et_EE fi_FI fr_XX gu_IN hi_IN it_IT ja_XX kk_KZ ko_KR lt_LT lv_LV my_MM
ne_NP nl_XX ro_RO ru_RU si_LK tr_TR vi_VN zh_CN af_ZA az_AZ bn_IN fa_IR he_IL hr_HR id_ID ka_GE km_KH
mk_MK ml_IN mn_MN mr_IN pl_PL ps_AF pt_XX sv_SE sw_KE ta_IN te_IN th_TH tl_XX uk_UA ur_PK xh_ZA gl_ES
sl_SI
""".split())
_MBART50_BY_LANG = {c.split("_")[0]: c for c in MBART50}

# Beyond CLDR's aliases: 639-3 -> 639-1 (or the code mBART uses).
_EXTRA_ALIASES = {"pbt": "ps", "quy": "qu", "fil": "tl", "tgl": "tl", "nob": "nb", "no": "nb"}
# A language with several FLORES-200 codes, named without a script.
_FLORES_DEFAULT = {"zh": "zho_Hans", "fa": "pes_Arab", "ak": "aka_Latn", "ks": "kas_Arab",
                   "kr": "knc_Latn", "ace": "ace_Latn", "bjn": "bjn_Latn", "taq": "taq_Latn",
                   "apc": "apc_Arab"}
_CODE_RE = re.compile(r"^(?P<lang>[a-z]{2,3})(?:_(?P<script>[a-z]{4}))?(?:_(?P<region>[a-z]{2}|\d{3}))?$")


class LangCodeError(ValueError):
    """A language code with no language token in the chosen style."""


def _base(lang: str) -> str:
    """639-1 where one exists (``deu`` -> ``de``, ``tgl`` -> ``tl``), else the code."""
    if lang in _EXTRA_ALIASES:
        return _EXTRA_ALIASES[lang]
    alias = get_global("language_aliases").get(lang)
    if alias is None:
        return lang
    alias = alias.split("_")[0]
    return _EXTRA_ALIASES.get(alias, alias)


@functools.cache
def _flores_by_base() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for code in FLORES200:
        out.setdefault(_base(code[:3]), []).append(code)
    return out


def _parse(code: str) -> tuple[str, str | None]:
    m = _CODE_RE.match(code.strip().replace("-", "_").lower()) if isinstance(code, str) else None
    if m is None:
        raise LangCodeError(f"not a language code: {code!r}")
    return m["lang"], m["script"].title() if m["script"] else None


@functools.cache
def flores_code(code: str) -> str:
    """FLORES-200 / NLLB language token of ``code`` (``de`` -> ``deu_Latn``)."""
    lang, script = _parse(code)
    candidates = _flores_by_base().get(_base(lang), [])
    exact = [c for c in candidates if c[:3] == lang] or candidates  # "prs" vs "pes" (both fa)
    if script is not None:
        exact = [c for c in exact if c.endswith("_" + script)]
    if len(exact) == 1:
        return exact[0]
    default = _FLORES_DEFAULT.get(_base(lang))
    if exact and script is None and default in exact:
        return default
    raise LangCodeError(f"language code {code!r} has no FLORES-200 (NLLB) language token")


@functools.cache
def mbart50_code(code: str) -> str:
    """mBART-50 language token of ``code`` (``deu_Latn`` -> ``de_DE``)."""
    lang, _ = _parse(code)
    token = _MBART50_BY_LANG.get(_base(lang))
    if token is None:
        raise LangCodeError(f"language code {code!r} has no mBART-50 language token "
                            f"(mBART-50 covers {len(MBART50)} languages)")
    return token


def lang_code_token(code: str, style: str) -> str:
    """The language token of ``code`` for ``data.lang_code_style`` (flores | mbart50)."""
    if style == "flores":
        return flores_code(code)
    if style == "mbart50":
        return mbart50_code(code)
    raise ValueError(f"data.lang_code_style must be flores or mbart50, got {style!r}")


def t5_tag(code: str) -> str:
    """T5-style target tag: ``"<2{code}>"`` with the code as configured."""
    return f"<2{code}>"
