"""The datasets of l4lab.data, checked by parsing what they hold: Python's int maths for sums, a bracket
stack and ``ast`` for code, dictionaries for recall, string search in the corpus for text."""

from __future__ import annotations

import ast
import json
import re

import pytest
import torch

from l4lab import data
from l4lab.data import DOMAINS, BatchSampler, TokenDataset
from l4lab.tokenizer import ByteTokenizer

PAD, SEP = 258, 259
tok = ByteTokenizer()


@pytest.fixture(scope="module")
def mix() -> TokenDataset:
    return data.mixture(300, 160, seed=3)


@pytest.fixture(scope="module")
def corpus() -> str:
    return data.corpus_text()


def segments(row: int, dataset: TokenDataset) -> list[tuple[int, int]]:
    """[start, end) of each segment of a mixture row, the closing <|sep|> included."""
    spans, start = [], 0
    for t, token in enumerate(dataset.tokens[row].tolist()):
        if token == SEP:
            spans.append((start, t + 1))
            start = t + 1
    return spans


def balanced(text: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in text:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


# ---------------------------------------------------------------------------------------------- mixture


def test_mixture_shapes_and_masks(mix: TokenDataset) -> None:
    assert mix.tokens.shape == (300, 160) and mix.tokens.dtype == torch.long
    assert len(mix) == 300
    assert int(mix.tokens.min()) >= 0 and int(mix.tokens.max()) < 260
    assert mix.domains is not None and mix.loss_mask is not None and mix.answers is not None
    pad = mix.tokens == PAD
    assert pad.any(), "some rows should end in padding"
    expected = ~pad
    expected[:, 0] = False
    assert torch.equal(mix.loss_mask, expected)
    assert torch.equal(mix.domains == -1, pad)
    # padding only at the end of a row
    for row in range(len(mix)):
        n = int((~pad[row]).sum())
        assert pad[row, n:].all() and not pad[row, :n].any()
    assert set(mix.domains[~pad].unique().tolist()) == set(range(len(DOMAINS)))
    assert torch.equal(mix.target_mask, mix.loss_mask[:, 1:])
    assert torch.equal(mix.inputs, mix.tokens[:, :-1]) and torch.equal(mix.targets, mix.tokens[:, 1:])


def test_mixture_segments_have_their_domains_shape(mix: TokenDataset, corpus: str) -> None:
    seen = {name: 0 for name in DOMAINS}
    for row in range(len(mix)):
        spans = segments(row, mix)
        end = spans[-1][1]
        assert int((mix.tokens[row, end:] != PAD).sum()) == 0, "every real token belongs to a segment"
        for start, stop in spans:
            labels = mix.domains[row, start:stop].unique().tolist()
            assert len(labels) == 1, "one domain per segment, its <|sep|> included"
            domain = DOMAINS[labels[0]]
            seen[domain] += 1
            ids = mix.tokens[row, start : stop - 1]
            assert SEP not in ids.tolist() and PAD not in ids.tolist()
            text = tok.decode(ids)
            answers = mix.answers[row, start : stop - 1]
            expected_answers = torch.zeros_like(answers)
            if domain == "arithmetic":
                assert re.fullmatch(r"(\d+\+\d+=\d+;)+", text), text
                for match in re.finditer(r"(\d+)\+(\d+)=(\d+);", text):
                    a, b, total = (int(g) for g in match.groups())
                    assert a + b == total, text
                    assert match.group(3) == str(total)  # no leading zeros
                    expected_answers[match.start(3) : match.end(3)] = True
            elif domain == "code":
                assert balanced(text), text
                assert re.search(r"[()\[\]{}]", text), text
                if set(text) - set("()[]{}"):
                    ast.parse(text)  # the code-like lines are real Python
            elif domain == "copy":
                match = re.fullmatch(r"([a-z]+)>([a-z]+)", text)
                assert match and match.group(1) == match.group(2), text
                expected_answers[match.start(2) :] = True
            elif domain == "recall":
                match = re.fullmatch(r"((?:[a-z]=\d,)*[a-z]=\d)\?([a-z])=(\d)", text)
                assert match, text
                pairs = dict(item.split("=") for item in match.group(1).split(","))
                assert len(pairs) == match.group(1).count(",") + 1, "keys are distinct"
                assert pairs[match.group(2)] == match.group(3), text
                expected_answers[-1] = True
            else:
                assert text in corpus, text
            assert torch.equal(answers, expected_answers), (domain, text)
    assert all(count > 20 for count in seen.values()), seen


def test_mixture_is_deterministic() -> None:
    a, b, c = data.mixture(20, 64, seed=1), data.mixture(20, 64, seed=1), data.mixture(20, 64, seed=2)
    for field in ("tokens", "loss_mask", "domains", "answers"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("length", [2, 5, 9, 1000])
def test_mixture_any_length(length: int) -> None:
    dataset = data.mixture(4, length, seed=0)
    assert dataset.tokens.shape == (4, length)
    assert (dataset.tokens[:, 0] != PAD).all(), "no row is empty"


def test_mixture_errors() -> None:
    with pytest.raises(ValueError, match="num_sequences must be positive"):
        data.mixture(0, 64)
    with pytest.raises(ValueError, match="length must be positive"):
        data.mixture(2, -1)
    with pytest.raises(ValueError, match="too short"):
        data.mixture(2, 1)


# -------------------------------------------------------------------------------------- induction heads


@pytest.mark.parametrize("length", [64, 4096])
def test_induction_heads(length: int) -> None:
    vocab = 16
    dataset = data.induction_heads(32, length, vocab_size=vocab, seed=0)
    tokens = dataset.tokens
    assert tokens.shape == (32, length)
    assert int(tokens.min()) >= 0 and int(tokens.max()) == vocab - 1
    assert torch.equal(dataset.loss_mask.sum(dim=1), torch.ones(32, dtype=torch.long))
    assert dataset.loss_mask[:, -1].all()
    assert torch.equal(dataset.answers, dataset.loss_mask)
    for row in tokens.tolist():
        triggers = [t for t, token in enumerate(row) if token == vocab - 1]
        assert len(triggers) == 2 and triggers[1] == length - 2
        assert row[-1] == row[triggers[0] + 1] != vocab - 1
    # the first trigger's position varies
    first = (tokens == vocab - 1).int().argmax(dim=1)
    assert len(first.unique()) > 10


def test_induction_heads_long_and_deterministic() -> None:
    long = data.induction_heads(2, 16384, seed=5)
    assert long.tokens.shape == (2, 16384)
    assert ((long.tokens == 15).sum(dim=1) == 2).all()
    assert torch.equal(data.induction_heads(4, 64, seed=1).tokens, data.induction_heads(4, 64, seed=1).tokens)
    assert not torch.equal(
        data.induction_heads(4, 64, seed=1).tokens, data.induction_heads(4, 64, seed=2).tokens
    )


def test_induction_heads_errors() -> None:
    with pytest.raises(ValueError, match="vocab_size 2 is too small"):
        data.induction_heads(2, 64, vocab_size=2)
    with pytest.raises(ValueError, match="length 3 is too short"):
        data.induction_heads(2, 3)
    with pytest.raises(ValueError, match="num_sequences must be positive"):
        data.induction_heads(0, 64)


# -------------------------------------------------------------------------------------------- passkey

PASSKEY_PATTERN = re.compile(
    r"(?P<prefix>[A-Za-z. ]*)\n"
    r"The pass key is (?P<key>\d+)\. Remember it\. (?P=key) is the pass key\.\n"
    r"(?P<suffix>[A-Za-z. ]*)\n"
    r"What is the pass key\? The pass key is (?P<answer>\d+)"
)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("length", [300, 2048])
def test_passkey(depth: float, length: int) -> None:
    dataset = data.passkey(8, length, depth, seed=0)
    assert dataset.tokens.shape == (8, length)
    assert torch.equal(dataset.answers, dataset.loss_mask)
    keys = set()
    for row in range(8):
        text = tok.decode(dataset.tokens[row])
        assert len(text) == length
        match = PASSKEY_PATTERN.fullmatch(text)
        assert match, text
        key = match.group("key")
        assert len(key) == 5 and key[0] != "0" and match.group("answer") == key
        keys.add(key)
        # the needle sits at the asked depth of the filler
        filler = len(match.group("prefix")) + len(match.group("suffix"))
        assert abs(len(match.group("prefix")) / filler - depth) <= 1 / filler
        assert "The grass is green." in match.group("prefix") + match.group("suffix")
        # only the answer digits count
        mask = dataset.loss_mask[row]
        assert int(mask.sum()) == 5 and mask[-5:].all()
        assert tok.decode(dataset.tokens[row][mask]) == key
    assert len(keys) > 1


def test_passkey_minimum_length_and_errors() -> None:
    shortest = data.passkey(2, 104, 0.5)
    assert PASSKEY_PATTERN.fullmatch(tok.decode(shortest.tokens[0]))
    with pytest.raises(ValueError, match=r"length 40 is too short for a passkey sequence.*at least 104"):
        data.passkey(2, 40, 0.5)
    with pytest.raises(ValueError, match="at least 110"):
        data.passkey(2, 100, 0.5, digits=7)
    for depth in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"depth must be a number in \[0, 1\]"):
            data.passkey(2, 256, depth)
    assert torch.equal(data.passkey(3, 256, 0.3, seed=4).tokens, data.passkey(3, 256, 0.3, seed=4).tokens)
    assert not torch.equal(data.passkey(3, 256, 0.3, seed=4).tokens, data.passkey(3, 256, 0.3, seed=5).tokens)
    three = data.passkey(2, 300, 0.5, digits=3)
    assert int(three.loss_mask.sum()) == 6


# ---------------------------------------------------------------------------------- associative recall


def test_associative_recall() -> None:
    pairs, queries, vocab = 8, 5, 64
    dataset = data.associative_recall(50, pairs, queries, vocab_size=vocab, seed=0)
    assert dataset.tokens.shape == (50, 2 * (pairs + queries))
    assert torch.equal(dataset.answers, dataset.loss_mask)
    for row, mask in zip(dataset.tokens.tolist(), dataset.loss_mask.tolist(), strict=True):
        keys, values = row[0 : 2 * pairs : 2], row[1 : 2 * pairs : 2]
        assert all(0 <= k < vocab // 2 for k in keys) and all(vocab // 2 <= v < vocab for v in values)
        assert len(set(keys)) == pairs and len(set(values)) == pairs
        table = dict(zip(keys, values, strict=True))
        asked = row[2 * pairs :: 2]
        assert len(set(asked)) == queries and set(asked) <= set(keys)
        targets = [row[t] for t in range(len(row)) if mask[t]]
        assert targets == [table[k] for k in asked]
        assert [t for t in range(len(row)) if mask[t]] == list(range(2 * pairs + 1, len(row), 2))
    again = data.associative_recall(50, pairs, queries, vocab_size=vocab, seed=0)
    assert torch.equal(again.tokens, dataset.tokens)
    assert not torch.equal(data.associative_recall(50, pairs, queries, seed=1).tokens, dataset.tokens)


def test_associative_recall_errors() -> None:
    with pytest.raises(ValueError, match=r"vocab_size 16 is too small for 10 pairs.*vocab_size >= 20"):
        data.associative_recall(2, 10, 2, vocab_size=16)
    with pytest.raises(ValueError, match="num_queries 5 > num_pairs 4"):
        data.associative_recall(2, 4, 5)
    with pytest.raises(ValueError, match="num_pairs must be positive"):
        data.associative_recall(2, 0, 1)


# --------------------------------------------------------------------------------------------- corpus


def test_corpus_text(corpus: str) -> None:
    assert len(corpus) > 50_000
    assert sum(ch.isascii() for ch in corpus) / len(corpus) > 0.99
    assert sum(ch.isalpha() or ch.isspace() for ch in corpus) / len(corpus) > 0.85
    words = re.findall(r"[a-z]+", corpus.lower())
    for common in ("the", "of", "and", "is", "to", "a"):
        assert words.count(common) > 200, common
    assert not re.search(r"^\s*>>>", corpus, re.MULTILINE), "doctest examples are removed"
    assert data.corpus_text(1000) == corpus[:1000]
    data._full_corpus.cache_clear()
    assert data.corpus_text() == corpus, "reading the files again gives the same text"
    with pytest.raises(ValueError, match="max_chars"):
        data.corpus_text(-1)


def test_corpus_dataset(corpus: str) -> None:
    dataset = data.corpus_dataset(128, max_chars=10_000)
    expected = corpus[:10_000].encode("utf-8")
    assert dataset.tokens.shape == (len(expected) // 128, 128)
    assert dataset.loss_mask is None and dataset.target_mask.all()
    assert bytes(dataset.tokens.flatten().tolist()) == expected[: dataset.tokens.numel()]
    with pytest.raises(ValueError, match="shorter than one row"):
        data.corpus_dataset(128, max_chars=100)


# ------------------------------------------------------------------------------------- split, batches


def numbered(rows: int) -> TokenDataset:
    """Rows whose first token is their index, so rows can be told apart after shuffling."""
    tokens = torch.arange(rows).unsqueeze(1).repeat(1, 6)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    return TokenDataset(tokens, mask, None, mask.clone())


def test_split() -> None:
    dataset = numbered(50)
    train, val = dataset.split(0.8, seed=0)
    assert (len(train), len(val)) == (40, 10)
    a, b = set(train.tokens[:, 0].tolist()), set(val.tokens[:, 0].tolist())
    assert not a & b and a | b == set(range(50))
    assert torch.equal(train.tokens[:, 0], train.tokens[:, 0].sort().values), "original order kept"
    assert torch.equal(dataset.split(0.8, seed=0)[1].tokens, val.tokens)
    assert not torch.equal(dataset.split(0.8, seed=1)[1].tokens, val.tokens)
    assert train.loss_mask.shape == train.tokens.shape and train.answers.shape == train.tokens.shape
    assert torch.equal(dataset.rows(slice(2, 5)).tokens[:, 0], torch.tensor([2, 3, 4]))
    assert torch.equal(dataset[7].tokens, dataset.tokens[7:8])
    for fraction in (0.0, 1.0, 0.001):
        with pytest.raises(ValueError):
            dataset.split(fraction)


def test_token_dataset_checks_shapes() -> None:
    with pytest.raises(ValueError, match="long tensor"):
        TokenDataset(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="loss_mask"):
        TokenDataset(torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 5, dtype=torch.bool))


def test_batch_sampler_epochs() -> None:
    dataset = numbered(10)
    sampler = data.batches(dataset, batch_size=2, seed=0)
    epoch = torch.cat([sampler.next().tokens[:, 0] for _ in range(5)])
    assert sorted(epoch.tolist()) == list(range(10)), "each row once per epoch"
    batch = next(sampler)
    assert len(batch) == 2 and batch.loss_mask.shape == (2, 6)
    other = BatchSampler(dataset, 2, seed=1)
    assert not torch.equal(torch.cat([other.next().tokens for _ in range(5)])[:, 0], epoch)


@pytest.mark.parametrize("taken", [0, 1, 2, 3, 7])
def test_batch_sampler_resume(taken: int) -> None:
    dataset = numbered(10)
    reference = BatchSampler(dataset, batch_size=4, seed=7)  # 4 does not divide 10: batches cross epochs
    expected = [reference.next().tokens for _ in range(taken + 6)][taken:]

    interrupted = BatchSampler(dataset, batch_size=4, seed=7)
    for _ in range(taken):
        interrupted.next()
    saved = json.loads(json.dumps(interrupted.state()))
    resumed = BatchSampler(dataset, batch_size=4, seed=123)
    resumed.load_state(saved)
    for want in expected:
        assert torch.equal(resumed.next().tokens, want)


def test_batch_sampler_resume_exact() -> None:
    dataset = numbered(10)
    interrupted = BatchSampler(dataset, batch_size=4, seed=7)
    for _ in range(3):
        interrupted.next()
    saved = json.loads(json.dumps(interrupted.state()))
    resumed = BatchSampler(dataset, batch_size=4, seed=0)
    resumed.load_state(saved)
    for _ in range(8):
        assert torch.equal(resumed.next().tokens, interrupted.next().tokens)
    with pytest.raises(ValueError, match="num_rows"):
        BatchSampler(numbered(11), 4).load_state(saved)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        BatchSampler(dataset, 0)
