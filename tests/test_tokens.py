"""The run's own WordPiece tokenizer (vkd_dist/data/tokens.py): a vocabulary that depends on the reports only."""

from vkd_dist.data.tokens import SPECIAL_TOKENS, build_wordpiece_tokenizer, build_wordpiece_vocabulary

REPORTS = ["No effusion. Mild edema.", "Edema and effusion.", "Cardiomegaly, edema."]


def test_vocabulary_breaks_frequency_ties_alphabetically_whatever_the_report_order():
    chars = set("".join(REPORTS).lower()) - {" "}
    vocab = build_wordpiece_vocabulary(REPORTS, vocab_size=100)
    assert vocab[:len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    words = vocab[len(SPECIAL_TOKENS) + 2 * len(chars):]
    # edema 3x, effusion 2x, then the words seen once, alphabetically ("." and "," are character tokens already)
    assert words == ["edema", "effusion", "and", "cardiomegaly", "mild", "no"]
    assert build_wordpiece_vocabulary(reversed(REPORTS), vocab_size=100) == vocab


def test_vocabulary_stops_at_vocab_size_after_the_characters():
    full = build_wordpiece_vocabulary(REPORTS, vocab_size=100)
    small = build_wordpiece_vocabulary(REPORTS, vocab_size=len(full) - 2)
    assert small == full[:-2]


def test_built_tokenizer_replaces_the_old_one_and_encodes_with_cls_and_sep(tmp_path):
    out = tmp_path / "tokenizer"
    build_wordpiece_tokenizer(["unrelated words"], 50, out)
    tok = build_wordpiece_tokenizer(REPORTS, 100, out)
    assert tok.convert_ids_to_tokens(tok("Mild edema")["input_ids"]) == ["[CLS]", "mild", "edema", "[SEP]"]
    assert "unrelated" not in tok.get_vocab()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]  # no temporary directories left
