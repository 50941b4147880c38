"""English -> Chinese translation with MarianMT (transformers ``MarianMTModel`` + ``MarianTokenizer``)."""

from __future__ import annotations

import os

import torch

from dreampainter.errors import InvalidInputError, MissingFileError

from .common import check_positive, chunks, one_line, require_hf_folder, resolve_device

HINT = (
    "download a MarianMT en->zh folder, e.g. Helsinki-NLP/opus-mt-en-zh (config.json, model weights, "
    "source.spm, target.spm, vocab.json, tokenizer_config.json), and set path to it"
)


class MarianTranslator:
    """``Translator``: each text translated (empty texts stay empty)."""

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 16,
    ) -> None:
        from transformers import MarianMTModel, MarianTokenizer

        folder = require_hf_folder(path, "MarianMT model folder", HINT, model_types=("marian",))
        self.max_new_tokens = check_positive("max_new_tokens", max_new_tokens)
        self.batch_size = check_positive("batch_size", batch_size)
        self.device = resolve_device(device)
        for name in ("source.spm", "target.spm", "vocab.json"):
            if not (folder / name).is_file():
                raise MissingFileError(f"MarianMT tokenizer file not found: {folder / name} ({HINT})")
        try:
            self.tokenizer = MarianTokenizer.from_pretrained(str(folder), local_files_only=True)
        except ImportError as error:
            raise InvalidInputError(
                f"the Marian tokenizer needs sentencepiece (pip install sentencepiece): {one_line(error)}"
            ) from None
        except (OSError, ValueError, RuntimeError) as error:
            raise InvalidInputError(
                f"{folder}: not a readable MarianMT tokenizer ({one_line(error)})"
            ) from None
        try:
            self.model = MarianMTModel.from_pretrained(str(folder), local_files_only=True)
        except OSError as error:
            raise MissingFileError(
                f"MarianMT weights not found in {folder} ({HINT}): {one_line(error)}"
            ) from None
        except (ValueError, RuntimeError) as error:
            raise InvalidInputError(f"{folder}: not a loadable MarianMT model ({one_line(error)})") from None
        self.model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[str]:
        if isinstance(texts, str) or any(not isinstance(text, str) for text in texts):
            raise InvalidInputError("texts: expected a list of strings")
        texts = list(texts)
        translated = [""] * len(texts)
        todo = [i for i, text in enumerate(texts) if text.strip()]
        for indices in chunks(todo, self.batch_size):
            batch = self.tokenizer(
                [texts[i] for i in indices], return_tensors="pt", padding=True, truncation=True
            ).to(self.device)
            ids = self.model.generate(**batch, max_new_tokens=self.max_new_tokens)
            for i, text in zip(indices, self.tokenizer.batch_decode(ids, skip_special_tokens=True)):
                translated[i] = text.strip()
        return translated
