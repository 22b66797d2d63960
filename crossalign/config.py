"""The one configuration object: what the CLI builds and every Prefect flow takes.

Each stage has its own section, so the Prefect UI renders the config as a form
and pydantic refuses bad values (naming the field) before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Precision = Literal["auto", "fp32", "bf16", "fp16"]
CorpusFormat = Literal["auto", "jsonl", "csv", "tsv", "parquet", "flickr", "coco", "webdataset"]
CORPUS_FORMATS: tuple[str, ...] = tuple(f for f in get_args(CorpusFormat) if f != "auto")  # the readable formats
CompileMode = Literal["auto", "on", "off"]
GpuDecodeMode = Literal["nvjpeg", "nvimgcodec"]  # decoding on the GPU (CUDA only)
DecodeMode = Literal[Literal["auto", "threads", "processes"], GpuDecodeMode]  # nested Literals flatten
Metric = Literal["cosine", "l2", "dot"]
NormaliseMethod = Literal["none", "inverted_softmax", "dynamic"]


def corpus_name(root: Path | str, name: str | None = None) -> str:
    """A corpus's name inside a workspace: `name` if given, else the name of its folder (resolved)."""
    return name or Path(root).expanduser().resolve().name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CorpusConfig(_Section):
    """Where a corpus lives and how it is laid out ("folder + captions.jsonl")."""

    root: Path = Field(description="Folder holding the images and the captions file.")
    name: str | None = Field(
        default=None, description="Corpus name in the workspace; defaults to the folder's name."
    )
    format: CorpusFormat = Field(
        default="auto", description="Corpus layout; 'auto' detects it when only one fits."
    )
    captions_file: str = Field(
        default="captions.jsonl",
        description="Captions file under root (jsonl: {'image': path, 'captions': [str, ...], 'split': str}).",
    )
    image_column: str = Field(default="image", description="Table formats: the image path column.")
    caption_column: str = Field(default="caption", description="Table formats: the caption column (or its plural).")
    split_column: str = Field(default="split", description="Table formats: the split column, if any.")
    default_split: str = Field(default="train", description="Split for records that name none.")
    unlisted_split: str = Field(
        default="unlisted", min_length=1,
        description="flickr: split of the images that none of the split lists names (never silently train).",
    )
    max_pixels: int = Field(
        default=40_000_000, gt=0,
        description="Images with more pixels are rejected as too_many_pixels (decompression bombs).",
    )
    max_caption_chars: int = Field(
        default=1000, gt=0, description="Longer captions are truncated, and the truncation recorded."
    )

    @property
    def corpus_name(self) -> str:
        """The name this corpus has inside a workspace."""
        return corpus_name(self.root, self.name)


class ExtractConfig(_Section):
    """Frozen encoders and how to run them."""

    image_encoder: str = Field(
        default="efficientnet-lite0,efficientnet-lite2+flip",
        description="Image encoder registry name (a,b: side by side); efficientnet-lite0 alone is about 5x faster "
        "to extract, at lower quality.",
    )
    text_encoder: str = Field(
        default="minilm-l6,mpnet-base",
        description="Text encoder registry name (a,b: side by side); minilm-l6 alone is about 6x faster to extract, "
        "at lower quality.",
    )
    device: str = Field(default="auto", description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1' ...")
    precision: Precision = Field(
        default="auto",
        description="'auto': fp16 on CUDA; on the CPU the fastest precision measured faithful for each encoder "
        "(cosine >= 0.999 to fp32) that the CPU runs natively (EfficientNet-Lite: fp16 with AVX512-FP16; "
        "MiniLM: bf16 with AMX/AVX512-BF16), else fp32.",
    )
    compile: CompileMode = Field(
        default="auto",
        description="torch.compile the image encoder: 'auto' does on the CPU when 5,000+ images wait "
        "(compiling takes 15-45 s; Lite0 then runs about 1.4x faster).",
    )
    image_batch_size: int | None = Field(
        default=None, gt=0, description="Images per forward pass; default 32 on CPU, 256 on CUDA (backs off on OOM)."
    )
    text_batch_size: int = Field(default=256, gt=0)
    shard_size: int = Field(default=4096, gt=0, description="Rows per Parquet feature shard.")
    task_shards: int = Field(default=1, gt=0, description="Shards each extraction task encodes (more when the "
                             "corpus would otherwise need over max_tasks tasks).")
    max_tasks: int = Field(default=500, gt=0, description="Most extraction tasks per modality in one run: a 10M-item "
                           "corpus gets 500 tasks of 5 shards, not 2,442 of one.")
    decode: DecodeMode = Field(
        default="auto",
        description="Decode images in a thread pool (auto on the CPU: measured faster here), in spawned worker "
        "processes (auto on CUDA; started once per process, then reused), or on the GPU (CUDA only): with "
        "torchvision's nvJPEG, or with NVIDIA nvImageCodec (its package installed; not yet measured on a GPU).",
    )
    num_workers: int | None = Field(
        default=None, ge=0, description="Decode threads or processes; default: CPU cores - 1 (at least 1, at most 8); "
        "processes feeding a GPU: cores - 2 (at most 32)."
    )


class TrainConfig(_Section):
    """The cross-modal mapper and its training on cached features."""

    train_split: str = "train"
    eval_split: str = Field(default="dev", description="Split used for model selection and the reported metrics.")
    dim: int = Field(default=512, gt=0, description="Joint embedding dimension.")
    steps: int = Field(default=1200, gt=0, description="Training steps (the schedule warms up, then decays to 0 at the "
                       "last step; early stopping may end sooner).")
    batch_size: int = Field(default=512, gt=1)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_steps: int = Field(default=100, ge=0)
    input_dropout: float = Field(default=0.6, ge=0, lt=1, description="Dropout on the standardised input features "
                                 "(rounded to a multiple of 1/256).")
    method: Literal["train", "cca"] = Field(
        default="train", description="Train the linear maps, or fit them in closed form with regularised CCA."
    )
    init: Literal["random", "cca"] = Field(default="random", description="Start training from the CCA solution.")
    depth: int = Field(default=1, ge=1, description="Layers per modality: 1 is the linear map, more an MLP.")
    hidden: int = Field(default=2048, gt=0, description="Hidden width of the MLP (depth > 1).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout between the MLP's layers.")
    blocks: int = Field(default=0, ge=0, description="Residual adapter blocks (FuseMix) before the linear map, "
                        "hidden wide; 0 is the plain linear map.")
    heads: int = Field(default=1, ge=1, description="An ensemble in one mapper: this many linear mappers, each "
                       "dim/heads wide, trained one after the other with seeds seed, seed+1, ...; the joint vector "
                       "concatenates theirs. dim must split evenly.")
    mixup_alpha: float = Field(default=0.0, ge=0, description="Latent mixup (FuseMix): one λ ~ Beta(α, α) per "
                               "step mixes pairs within the batch; 0 is off.")
    loss: Literal["infonce", "vsepp", "margin"] = Field(
        default="infonce",
        description="Symmetric InfoNCE with a learnable temperature, VSE++ (hardest in-batch negative), or the "
        "pairwise margin loss of the original design (the reference).",
    )
    margin: float = Field(default=0.2, gt=0, description="Margin of the vsepp and margin losses.")
    init_temperature: float = Field(default=0.07, gt=0)
    eval_every: int = Field(default=100, gt=0)
    seed: int = 0
    device: str = Field(default="auto", description="Where the mapper trains: 'auto' (CUDA when available), 'cpu', "
                        "'cuda', 'cuda:1' ... (features stream from the split's cache files either way).")


    @model_validator(mode="after")
    def _heads_split_dim(self) -> TrainConfig:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} does not split into {self.heads} equal heads")
        return self


class QueryBankConfig(_Section):
    """Query-bank normalisation against hubness: a bank of the training split's vectors is saved with the
    mapper; each table row's normaliser against it is stored as a column; search re-ranks by it."""

    method: NormaliseMethod = Field(
        default="inverted_softmax",
        description="How search and evaluate score: raw cosine ('none'), inverted softmax over the bank, or its "
        "dynamic variant (QB-Norm: only queries whose nearest row is a hub of the bank).",
    )
    beta: float = Field(default=20.0, gt=0, description="Inverse temperature of the inverted softmax (saved with "
                        "the mapper; chosen on Flickr8k dev).")
    size: int = Field(default=10_000, gt=0, description="Bank size per modality: a random subsample of the "
                      "training split when it is larger (saved with the mapper).")
    seed: int = Field(default=0, description="Seed of the bank's subsample.")


class StoreConfig(_Section):
    """The LanceDB tables: which mapper's vectors they hold and how they are searched."""

    metric: Metric = Field(
        default="cosine", description="Distance of the vector index and searches (the vectors are unit length)."
    )
    mapper_id: str | None = Field(
        default=None, description="Embed with this mapper instead of the workspace's current one."
    )


class RunnerConfig(_Section):
    """Where the shard-level extraction tasks run: Prefect's thread pool, or a Dask cluster (prefect-dask)."""

    kind: Literal["threads", "dask"] = Field(
        default="threads",
        description="'threads': a thread pool in the flow's process; 'dask': prefect-dask's DaskTaskRunner, on "
        "dask_address or on a new LocalCluster of dask_workers spawned processes (needs prefect-dask).",
    )
    max_workers: int = Field(default=2, gt=0, description="threads: shard tasks that run at once.")
    dask_address: str | None = Field(
        default=None,
        description="dask: scheduler address of a running cluster (tcp://host:8786); its workers must see the "
        "workspace at the same path. Unset: a LocalCluster is started for the run and closed after it.",
    )
    dask_workers: int = Field(
        default=2, gt=0, description="dask, new LocalCluster: worker processes (one task at a time each)."
    )
    dask_resources: dict[str, float] = Field(
        default_factory=dict,
        description="dask: the resources each extraction task holds on its worker, e.g. {'GPU': 1} with workers "
        "started as `dask worker ... --resources GPU=1`: one extraction per GPU. A new LocalCluster's workers "
        "declare them too.",
    )

    @model_validator(mode="after")
    def _address_needs_dask(self) -> RunnerConfig:
        if self.dask_address and self.kind != "dask":
            raise ValueError(f"dask_address is set but kind is {self.kind!r}: set kind to 'dask' to use it")
        return self


class PipelineConfig(_Section):
    """Everything one pipeline run needs."""

    workspace: Path = Field(default=Path("crossalign-data"), description="Root of every table a run writes.")
    corpus: CorpusConfig
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    querybank: QueryBankConfig = Field(default_factory=QueryBankConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    queries: list[str] = Field(
        default_factory=list,
        description="Text queries to run after embedding, as a sample; default: three captions of the eval split.",
    )
    retrain: bool = Field(
        default=False, description="Train a new mapper even when the workspace has a current one."
    )

    @field_validator("workspace")
    @classmethod
    def _absolute_workspace(cls, value: Path) -> Path:
        return Path(value).expanduser().resolve()
