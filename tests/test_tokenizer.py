import io

import pytest
import sentencepiece as spm
import torch

from shared_ris import Tokenizer, TokenizerError

SENTENCES = ["the red circle on the left", "a large blue square", "the leftmost green triangle",
             "man in a white shirt", "zebra behind the tree", "the cup near the plate"] * 20


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "test.model"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=buf, vocab_size=60,
                                   model_type="unigram", hard_vocab_limit=False)
    path.write_bytes(buf.getvalue())
    return path


def test_xlmr_id_convention(spm_path):
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    tok = Tokenizer(spm_path, max_len=32)
    raw = sp.encode("the red circle qqq")
    expected = [0] + [p + 1 if p > 0 else 3 for p in raw] + [2]
    assert tok.encode("the red circle qqq") == expected
    assert tok.vocab_size == sp.get_piece_size() + 1
    ids, mask = tok(["the red circle qqq", "a cup"])
    assert ids.shape == mask.shape == (2, 32)
    assert ids[0, : len(expected)].tolist() == expected
    assert (ids[mask] == 1).all() and not mask[:, 0].any()
    assert mask[0].sum() == 32 - len(expected)


def test_unknown_piece_maps_to_unk(spm_path):
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    raw = sp.encode("Ω")
    assert 0 in raw  # sentencepiece unk
    assert 3 in Tokenizer(spm_path).encode("Ω")


def test_truncation_keeps_bos_and_eos(spm_path):
    tok = Tokenizer(spm_path, max_len=5)
    text = "the red circle on the left a large blue square"
    ids = tok.encode(text)
    assert len(ids) == 5 and ids[0] == 0 and ids[-1] == 2
    assert tok.is_truncated(text) and not tok.is_truncated("a")
    batch, mask = tok([text])
    assert batch.tolist() == [ids] and not mask.any()


def test_bad_inputs(spm_path, tmp_path):
    with pytest.raises(TokenizerError, match="empty referring expression"):
        Tokenizer(spm_path).encode("   ")
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer(tmp_path / "beit3.spm")
    (tmp_path / "junk.spm").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.spm")


def test_pad_to_longer_length(spm_path):
    ids, mask = Tokenizer(spm_path, max_len=8)(["a cup"], pad_to=20)
    assert ids.shape == (1, 20) and mask[0, 8:].all()
    assert torch.equal(ids[0, :8], Tokenizer(spm_path, max_len=8)(["a cup"])[0][0])
