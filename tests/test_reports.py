"""vkd_dist.data.reports: MIMIC section splitting, section choice with fallback, de-id spans."""

import pytest

from vkd_dist.data.reports import compose, normalise_text, parse_sections_arg, replace_deid, report_text, split_sections

MIMIC = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // ?pneumonia

 COMPARISON:  ___

 FINDINGS:
 
 The lungs are clear.  There is no
 pleural effusion.
 
 IMPRESSION:  
 
 No acute cardiopulmonary process.
"""


def test_split_sections_mimic():
    s = split_sections(MIMIC)
    assert list(s) == ["EXAMINATION", "INDICATION", "COMPARISON", "FINDINGS", "IMPRESSION"]
    assert "FINAL REPORT" not in " ".join(s.values())


def test_report_text_findings_impression():
    text, used = report_text(MIMIC)
    assert used == ["FINDINGS", "IMPRESSION"]
    assert text == ("FINDINGS: The lungs are clear. There is no pleural effusion.\n"
                    "IMPRESSION: No acute cardiopulmonary process.")


def test_fallback_to_whole_body_and_no_fallback():
    raw = "FINAL REPORT\nINDICATION: cough\n\nNOTIFICATION: called Dr. ___ at 3pm\n"
    text, used = report_text(raw)
    assert used == ["INDICATION", "NOTIFICATION"] and text.startswith("INDICATION: cough\nNOTIFICATION:")
    assert report_text(raw, fallback=False) == ("", [])
    # a report with no headers at all keeps its text as the preamble
    assert report_text("Heart size normal.\n  Lungs clear.")[0] == "Heart size normal. Lungs clear."


def test_only_impression_and_aliases():
    text, used = report_text("IMPRESSIONS: Small left effusion.")
    assert used == ["IMPRESSION"] and text == "IMPRESSION: Small left effusion."


def test_deid_token_collapses_runs():
    assert replace_deid("seen by Dr. ___ on ___ ___.", "token") == "seen by Dr. [DEID] on [DEID]."
    assert replace_deid("XXXX XXXX XXXX views. XXXX-year-old", "token") == "[DEID] views. [DEID]-year-old"
    assert replace_deid("Dr. ___", "keep") == "Dr. ___"
    with pytest.raises(ValueError, match="de-identification mode"):
        replace_deid("x", "drop")


def test_normalise_and_compose():
    assert normalise_text("  a\t b \r\n\r\n\n c  ") == "a b\nc"
    text, used = compose({"FINDINGS": "", "IMPRESSION": " ok "}, ["FINDINGS", "IMPRESSION"])
    assert (text, used) == ("IMPRESSION: ok", ["IMPRESSION"])
    assert parse_sections_arg("findings, impression") == ("FINDINGS", "IMPRESSION")
    with pytest.raises(ValueError, match="--sections"):
        parse_sections_arg(" , ")
