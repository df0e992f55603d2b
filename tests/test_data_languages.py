import pytest

from jaxft.data.languages import UnknownLanguageError, language_name

FLORES_LOCAL = (
    "asm_Beng ben_Beng deu_Latn eng_Latn fra_Latn guj_Gujr hin_Deva kan_Knda kas_Arab kas_Deva "
    "mai_Deva mal_Mlym mar_Deva mni_Beng npi_Deva ory_Orya pan_Guru rus_Cyrl san_Deva sat_Olck "
    "snd_Arab spa_Latn tam_Taml tel_Telu urd_Arab"
).split()


@pytest.mark.parametrize(
    "code,name",
    [
        ("de", "German"), ("deu", "German"), ("deu_Latn", "German"), ("DE", "German"),
        ("zho_Hant", "Chinese (Traditional)"), ("zho_Hans", "Chinese (Simplified)"),
        ("zh-Hant", "Chinese (Traditional)"), ("pt-BR", "Portuguese (Brazil)"),
        ("kas_Arab", "Kashmiri"), ("kas_Deva", "Kashmiri (Devanagari)"),
        ("sat_Olck", "Santali"), ("mni_Beng", "Manipuri"), ("npi_Deva", "Nepali"),
        ("yo", "Yoruba"), ("ne", "Nepali"), ("si", "Sinhala"), ("km", "Khmer"), ("ps", "Pashto"),
        ("yor_Latn", "Yoruba"), ("kor_Hang", "Korean"), ("prs_Arab", "Dari"),
        ("acm_Arab", "Mesopotamian Arabic"), ("taq_Tfng", "Tamasheq (Tifinagh)"),
    ],
)
def test_known_codes(code, name):
    assert language_name(code) == name


@pytest.mark.parametrize("code", FLORES_LOCAL)
def test_flores_codes_in_shared_data_are_known(code):
    assert language_name(code)


@pytest.mark.parametrize("code", ["xx", "qqq_Latn", "de-XX", "de_Qqqq", "", "english", "de--fr"])
def test_unknown_code_is_one_line_value_error_naming_it(code):
    with pytest.raises(UnknownLanguageError) as e:
        language_name(code)
    assert isinstance(e.value, ValueError)
    assert "\n" not in str(e.value) and repr(code).strip("'") in str(e.value)
