"""The tokenizer family: word- and character-level share specials, encode/decode and saving."""
from unlearn_fast.data.tokenizer import SPECIALS, CharTokenizer, WordTokenizer


def test_char_tokenizer_round_trips_and_keeps_its_ids():
    tok = CharTokenizer()
    ids = tok.encode("Ada is 7!")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ids[1] == 4 + CharTokenizer.chars.index("A")  # ids 0-3 are the specials, then printable ASCII
    assert tok.decode(ids) == "Ada is 7!"
    assert tok.vocab_size == len(SPECIALS) + len(CharTokenizer.chars)
    assert tok.encode("\u00e9", add_special_tokens=False) == [tok.unk_token_id]


def test_both_save_what_they_need(tmp_path):
    CharTokenizer().save_pretrained(tmp_path / "c")
    assert (tmp_path / "c" / "char_tokenizer.json").exists()
    word = WordTokenizer.from_texts(["Ada lives in Quell."])
    word.save_pretrained(tmp_path / "w")
    again = WordTokenizer.from_pretrained(tmp_path / "w")
    assert again.vocab == word.vocab and again.decode(again.encode("Ada lives")) == "Ada lives"
