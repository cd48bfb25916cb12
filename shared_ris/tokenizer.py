"""XLM-R style ids on a sentencepiece model, as BEiT-3 uses ``beit3.spm``.

``transformers`` 5.x silently mis-loads ``beit3.spm`` (a 5-token vocabulary), so we drive
``sentencepiece`` directly and apply the fairseq convention ourselves.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
import torch

from .errors import SharedRISError

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


class TokenizerError(SharedRISError):
    """The tokenizer file or the text cannot be used; one line for the user."""


class Tokenizer:
    """Sentence → ``[<s>] + pieces[:max_len - 2] + [</s>]``, right-padded with ``<pad>``.

    A sentencepiece id p > 0 becomes p + 1; sentencepiece's unk (0) becomes 3.

    Args:
        spm_path: a sentencepiece model file (``beit3.spm`` or the synthetic set's ``spm.model``).
        max_len: total length including ``<s>`` and ``</s>``.
    """

    def __init__(self, spm_path: str | Path, max_len: int = 20) -> None:
        path = Path(spm_path)
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found; pass --tokenizer beit3.spm (or the synthetic set's spm.model)")
        if max_len < 3:
            raise TokenizerError(f"max_len must be at least 3 (<s>, one piece, </s>), got {max_len}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception:
            raise TokenizerError(f"{path}: not a sentencepiece model") from None
        self.path = path
        self.max_len = max_len

    @property
    def vocab_size(self) -> int:
        """Rows a text embedding needs for every id this tokenizer can produce."""
        return self.sp.GetPieceSize() + 1

    def pieces(self, text: str) -> list[int]:
        """Token ids of the text's pieces, without specials or truncation."""
        return [p + 1 if p > 0 else UNK_ID for p in self.sp.EncodeAsIds(text)]

    def is_truncated(self, text: str) -> bool:
        return len(self.sp.EncodeAsIds(text)) > self.max_len - 2

    def encode(self, text: str) -> list[int]:
        """Unpadded ids: ``[0] + pieces[:max_len - 2] + [2]``."""
        if not isinstance(text, str) or not text.strip():
            raise TokenizerError("empty referring expression; give a non-empty text such as 'the red cup'")
        return [BOS_ID] + self.pieces(text)[: self.max_len - 2] + [EOS_ID]

    def __call__(self, texts: str | list[str], pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts → ids (B, L) long and padding mask (B, L) bool (True = pad).

        L is ``pad_to`` if given, else ``max_len``.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = pad_to or self.max_len
        ids = torch.full((len(texts), length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            encoded = self.encode(text)[:length]
            ids[row, : len(encoded)] = torch.tensor(encoded)
        return ids, ids == PAD_ID
