"""Tokenizers: the byte-level one against Python's own UTF-8 codec, the Hugging Face wrapper against
the ``tokenizers`` library (and transformers) used directly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import l4lab
from l4lab.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

SPECIALS = {"<|begin_of_text|>": 256, "<|end_of_text|>": 257, "<|pad|>": 258, "<|sep|>": 259}


@pytest.fixture
def tok() -> ByteTokenizer:
    return ByteTokenizer()


# ---------------------------------------------------------------- ByteTokenizer


def test_byte_vocab_matches_tiny_preset(tok: ByteTokenizer) -> None:
    config = l4lab.preset("tiny")
    assert tok.vocab_size == 260 == config.vocab_size
    assert tok.bos_token_id == 256 == config.bos_token_id
    assert tok.eos_token_id == 257 == config.eos_token_id
    assert tok.pad_token_id == 258
    assert tok.special_tokens == SPECIALS


@pytest.mark.parametrize(
    "text",
    ["", "hello, world", "naïve 日本語 🦙", "tabs\tand\nnewlines\r\n", "\x00\x7f", "é" * 3 + "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"],
)
def test_byte_ids_are_utf8_bytes_and_round_trip(tok: ByteTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_multibyte_characters_take_several_tokens(tok: ByteTokenizer) -> None:
    assert tok.encode("日") == [0xE6, 0x97, 0xA5]
    assert len(tok.encode("🦙")) == 4
    assert len(tok.encode("naïve 日本語 🦙")) == len("naïve 日本語 🦙".encode())


def test_specials_in_text_are_single_ids(tok: ByteTokenizer) -> None:
    text = "<|begin_of_text|>Q<|sep|>A<|end_of_text|><|pad|><|pad|>"
    ids = tok.encode(text)
    assert ids == [256, ord("Q"), 259, ord("A"), 257, 258, 258]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "QA"


def test_partial_special_strings_stay_bytes(tok: ByteTokenizer) -> None:
    for text in ("<|sep", "<|sep|", "|sep|>", "<|SEP|>", "< |sep|>"):
        assert tok.encode(text) == list(text.encode("utf-8"))


def test_bos_eos_flags(tok: ByteTokenizer) -> None:
    body = list(b"hi")
    assert tok.encode("hi") == body
    assert tok.encode("hi", bos=True) == [256, *body]
    assert tok.encode("hi", eos=True) == [*body, 257]
    assert tok.encode("hi", bos=True, eos=True) == [256, *body, 257]
    assert tok.encode("", bos=True, eos=True) == [256, 257]


def test_decode_keeps_characters_whole_around_specials(tok: ByteTokenizer) -> None:
    ids = [*"日".encode(), 259, *"🦙".encode()]
    assert tok.decode(ids) == "日<|sep|>🦙"
    assert tok.decode(ids, skip_special_tokens=True) == "日🦙"


@pytest.mark.parametrize(
    "raw",
    [b"\xff", b"ok\xfe\xffok", "日".encode()[:2], b"\xc3(", "🦙".encode()[1:]],
)
def test_decode_invalid_utf8_replaces_instead_of_failing(tok: ByteTokenizer, raw: bytes) -> None:
    text = tok.decode(list(raw))
    assert text == raw.decode("utf-8", errors="replace")
    assert "\ufffd" in text


def test_decode_split_character_across_special_is_replaced(tok: ByteTokenizer) -> None:
    first, second = "日".encode()[:1], "日".encode()[1:]
    assert tok.decode([*first, 259, *second]) == "\ufffd<|sep|>" + second.decode("utf-8", errors="replace")


def test_decode_accepts_tensors_and_numpy(tok: ByteTokenizer) -> None:
    text = "naïve 日本語 🦙<|sep|>"
    ids = tok.encode(text, bos=True)
    expected = "<|begin_of_text|>" + text
    for dtype in (torch.long, torch.int32, torch.int16):
        assert tok.decode(torch.tensor(ids, dtype=dtype)) == expected
    assert tok.decode(np.array(ids)) == expected
    assert tok.decode(tuple(ids)) == expected
    assert tok.decode(tok(text, bos=True)[0]) == expected


@pytest.mark.parametrize("bad", [260, 1000, -1])
def test_decode_out_of_range_names_the_id(tok: ByteTokenizer, bad: int) -> None:
    with pytest.raises(ValueError) as info:
        tok.decode([104, bad, 105])
    message = str(info.value)
    assert str(bad) in message
    assert "[0, 260)" in message


def test_decode_out_of_range_in_tensor(tok: ByteTokenizer) -> None:
    with pytest.raises(ValueError, match=r"token id 300 .*\[0, 260\)"):
        tok.decode(torch.tensor([1, 300]))


def test_decode_rejects_non_ids(tok: ByteTokenizer) -> None:
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError):
        tok.decode(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError):
        tok.decode([104, 1.5])
    with pytest.raises(TypeError):
        tok.decode("hi")  # type: ignore[arg-type]


def test_encode_rejects_non_text(tok: ByteTokenizer) -> None:
    with pytest.raises(TypeError):
        tok.encode(b"hi")  # type: ignore[arg-type]


def test_call_returns_batch_of_one(tok: ByteTokenizer) -> None:
    batch = tok("naïve 🦙", bos=True, eos=True)
    expected = [256, *"naïve 🦙".encode(), 257]
    assert isinstance(batch, torch.Tensor)
    assert batch.dtype == torch.long
    assert batch.shape == (1, len(expected))
    assert batch[0].tolist() == expected
    assert tok("").shape == (1, 0)


def test_byte_ids_fit_the_tiny_model(tok: ByteTokenizer) -> None:
    torch.manual_seed(0)
    model = l4lab.Llama4(l4lab.preset("tiny")).eval()
    ids = tok("naïve 日本語 🦙", bos=True)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], tok.vocab_size)


def test_byte_round_trip_property() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    strategies = pytest.importorskip("hypothesis.strategies")
    tok = ByteTokenizer()

    @hypothesis.settings(max_examples=200, deadline=None)
    @hypothesis.given(strategies.text())
    def check(text: str) -> None:
        hypothesis.assume(not any(special in text for special in SPECIALS))
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text

    check()


def test_load_tokenizer_bytes() -> None:
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)


# ---------------------------------------------------------------- HFTokenizer

VOCAB = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "the": 4, "llama": 5, "eats": 6, "grass": 7, ".": 8}
TEXTS = ["the llama eats grass .", "the llama eats the llama.", "grass", "", "zebras eat grass"]


def build_tokenizer():  # -> tokenizers.Tokenizer
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(VOCAB, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<s>", "</s>", "<pad>"])
    return tokenizer


def write_checkpoint(directory: Path, config: dict | None = None, with_post_processor: bool = False) -> Path:
    tokenizer = build_tokenizer()
    if with_post_processor:
        # the way many published tokenizer.json files prepend bos on their own
        from tokenizers.processors import TemplateProcessing

        tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(directory / "tokenizer.json"))
    if config is None:
        config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def test_hf_encode_decode_match_tokenizers(tmp_path: Path) -> None:
    oracle = build_tokenizer()
    tok = load_tokenizer(write_checkpoint(tmp_path))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == len(VOCAB) == oracle.get_vocab_size(with_added_tokens=True)
    for text in TEXTS:
        expected = oracle.encode(text, add_special_tokens=False).ids
        ids = tok.encode(text)
        assert ids == expected
        assert tok.decode(ids) == oracle.decode(expected, skip_special_tokens=False)
    # independent of the oracle: the WordLevel vocabulary looked up by hand
    assert tok.encode("the llama eats grass .") == [4, 5, 6, 7, 8]
    assert tok.encode("zebras eat grass") == [0, 0, 7]
    assert tok.decode([4, 5, 6, 7, 8]) == "the llama eats grass ."


def test_hf_bos_eos_ids_and_flags(tmp_path: Path) -> None:
    tok = load_tokenizer(write_checkpoint(tmp_path))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)
    assert tok.special_tokens == {"<s>": 1, "</s>": 2, "<pad>": 3}
    assert tok.encode("the llama") == [4, 5]
    assert tok.encode("the llama", bos=True) == [1, 4, 5]
    assert tok.encode("the llama", eos=True) == [4, 5, 2]
    assert tok.encode("the llama", bos=True, eos=True) == [1, 4, 5, 2]


def test_hf_specials_in_text_and_skip(tmp_path: Path) -> None:
    tok = load_tokenizer(write_checkpoint(tmp_path))
    ids = tok.encode("<s> the llama </s>")
    assert ids == [1, 4, 5, 2]
    assert tok.decode(ids) == "<s> the llama </s>"
    assert tok.decode(ids, skip_special_tokens=True) == "the llama"


def test_hf_encode_ignores_post_processor(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, with_post_processor=True)
    oracle = pytest.importorskip("tokenizers").Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert oracle.encode("the llama").ids == [1, 4, 5]  # the file adds bos by itself...
    tok = load_tokenizer(tmp_path)
    assert tok.encode("the llama") == [4, 5]  # ...l4lab adds it only when asked
    assert tok.encode("the llama", bos=True) == [1, 4, 5]


def test_hf_special_tokens_as_dicts_and_from_special_tokens_map(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, config={"bos_token": {"content": "<s>", "lstrip": False}})
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "</s>", "eos_token": {"content": "</s>", "special": True}}), encoding="utf-8"
    )
    tok = load_tokenizer(tmp_path)
    assert tok.bos_token_id == 1  # tokenizer_config.json wins
    assert tok.eos_token_id == 2  # filled in from special_tokens_map.json
    assert tok.pad_token_id is None


def test_hf_without_config_has_no_bos_eos(tmp_path: Path) -> None:
    build_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_token_id is None
    assert tok.eos_token_id is None
    assert tok.encode("the llama") == [4, 5]
    with pytest.raises(ValueError, match="bos_token"):
        tok.encode("the llama", bos=True)


def test_hf_unknown_bos_token_is_an_error(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, config={"bos_token": "<|begin_of_text|>"})
    with pytest.raises(ValueError, match=r"<\|begin_of_text\|>"):
        load_tokenizer(tmp_path)


def test_hf_decode_tensor_call_and_range(tmp_path: Path) -> None:
    tok = load_tokenizer(write_checkpoint(tmp_path))
    batch = tok("the llama eats grass", bos=True)
    assert batch.dtype == torch.long
    assert batch.tolist() == [[1, 4, 5, 6, 7]]
    assert tok.decode(batch[0], skip_special_tokens=True) == "the llama eats grass"
    with pytest.raises(ValueError, match=r"token id 9 .*\[0, 9\)"):
        tok.decode([4, 9])


def test_hf_accepts_tokenizer_json_path(tmp_path: Path) -> None:
    write_checkpoint(tmp_path)
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.bos_token_id == 1
    assert tok.encode("grass") == [7]


def test_hf_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    write_checkpoint(tmp_path)
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
    )
    assert tok.vocab_size == len(reference)
    for text in [*TEXTS, "<s> the llama </s>"]:
        expected = reference.encode(text, add_special_tokens=False)
        assert tok.encode(text) == expected
        for skip in (False, True):
            assert tok.decode(expected, skip_special_tokens=skip) == reference.decode(
                expected, skip_special_tokens=skip
            )


# ---------------------------------------------------------------- errors


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        load_tokenizer(missing)


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "tokenizer.json" in message
    assert "tokenizer.model" in message


def test_sentencepiece_only_directory(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"not really sentencepiece")
    with pytest.raises(FileNotFoundError, match="sentencepiece"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="sentencepiece"):
        load_tokenizer(tmp_path / "tokenizer.model")


def test_directory_named_bytes_is_still_loadable(tmp_path: Path) -> None:
    directory = tmp_path / "bytes"
    directory.mkdir()
    write_checkpoint(directory)
    assert isinstance(load_tokenizer(directory), HFTokenizer)


def test_missing_tokenizers_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_checkpoint(tmp_path)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` raise ImportError
    with pytest.raises(ImportError, match="pip install tokenizers"):
        load_tokenizer(tmp_path)
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)  # the byte tokenizer needs nothing


def test_import_does_not_load_tokenizers() -> None:
    import subprocess

    code = "import sys, l4lab.tokenizer; assert 'tokenizers' not in sys.modules, 'imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)
