from hypothesis import given, settings
from hypothesis import strategies as st

from common.tokenizer import get_tokenizer


def test_known_ids():
    tok = get_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_token_id == 50256 and tok.vocab_size == 50257
    assert tok.decode([50256]) == "<|endoftext|>"


def test_user_text_cannot_smuggle_the_special_token():
    assert 50256 not in get_tokenizer().encode("a <|endoftext|> b")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trips_arbitrary_unicode(text):
    tok = get_tokenizer()
    assert tok.decode(tok.encode(text)) == text
