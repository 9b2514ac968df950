"""core.vl: the docs/method.md §2 image rule and messages, prompt encoding, and the batch forward kwargs
that must score completions exactly as the generating forward did."""

import io

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from core.config import FORMAT_PROMPT, DataConfig
from core.records import Prompt
from core.vl import (
    PromptTooLong,
    build_messages,
    encode_prompt,
    image_inputs,
    load_processor,
    model_inputs,
    prepare_image,
)

MIN, MAX = 3136, 1806336  # docs/method.md §2


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_path):
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_pretrained(tiny_model_path).eval(), load_processor(tiny_model_path)


def _png(size, mode="RGB", color=0) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _prompt(problem="<image>Find x.", image=None, id="p-1") -> Prompt:
    return Prompt(id=id, index=0, problem=problem, answer="3", image=image or _png((224, 224), color=(255, 255, 255)))


# ------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("size, expected", [
    ((2000, 1000), (1900, 950)),    # over max: sqrt(1806336/2e6) = 0.9504 -> int(1900.7), int(950.35)
    ((1345, 1344), (1344, 1343)),   # one row over max
    ((1344, 1344), (1344, 1344)),   # exactly max: unchanged
    ((56, 56), (56, 56)),           # exactly min: unchanged
    ((40, 20), (79, 39)),           # under min: sqrt(3136/800) = 1.9799; truncation leaves it under min
    ((55, 56), (55, 56)),           # under min, but truncation gives back the same size (as the reference)
    ((224, 224), (224, 224)),       # in range
])
def test_prepare_image_applies_the_reference_rescale(size, expected):
    image = prepare_image(_png(size), min_pixels=MIN, max_pixels=MAX)
    assert image.size == expected and image.mode == "RGB"


def test_prepare_image_uses_pil_default_resampling_and_converts_to_rgb():
    source = Image.new("L", (40, 20))
    source.putdata([(7 * i) % 256 for i in range(800)])
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    image = prepare_image(buffer.getvalue(), min_pixels=MIN, max_pixels=MAX)
    assert image.mode == "RGB"
    assert list(image.getdata()) == list(source.resize((79, 39)).convert("RGB").getdata())


def test_prepare_image_converts_rgba_and_palette_to_rgb():
    assert prepare_image(_png((60, 60), "RGBA", (1, 2, 3, 4)), min_pixels=MIN, max_pixels=MAX).getpixel((0, 0)) == (1, 2, 3)
    assert prepare_image(_png((60, 60), "P"), min_pixels=MIN, max_pixels=MAX).mode == "RGB"


@pytest.mark.parametrize("data", [b"not an image", _png((64, 64))[:60], b""])
def test_undecodable_image_names_its_source_and_the_fix(data):
    with pytest.raises(ValueError, match=r"synthetic-0-17.*cannot be decoded.*re-encode"):
        prepare_image(data, min_pixels=MIN, max_pixels=MAX, source="synthetic-0-17")


def test_huge_image_is_refused_before_decoding():
    with pytest.raises(ValueError, match=r"geo-9 is 9000x9000 pixels, over the 64,000,000-pixel limit"):
        prepare_image(_png((9000, 9000), "1"), min_pixels=MIN, max_pixels=MAX, source="geo-9")


def test_too_elongated_image_is_refused():
    with pytest.raises(ValueError, match=r"p-3 is 3067x1, more elongated than 200:1"):
        prepare_image(_png((3000, 1)), min_pixels=MIN, max_pixels=MAX, source="p-3")


# ---------------------------------------------------------------------------------------- messages
def test_messages_split_on_the_image_placeholder():
    [message] = build_messages("<image>Find x.", format_prompt="  Think.  ")
    assert message == {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x. Think."}]}
    [message] = build_messages("As shown: <image> Find x.", format_prompt=FORMAT_PROMPT)
    assert message["content"] == [{"type": "text", "text": "As shown: "}, {"type": "image"},
                                  {"type": "text", "text": " Find x. " + FORMAT_PROMPT}]


@pytest.mark.parametrize("problem", ["Find x.", "<image><image>Find x."])
def test_problem_without_exactly_one_image_is_refused(problem):
    with pytest.raises(ValueError, match="exactly one <image>"):
        build_messages(problem, format_prompt=FORMAT_PROMPT)


# ------------------------------------------------------------------------------------ prompt inputs
def test_encode_prompt_expands_the_image_into_its_vision_tokens(model_and_processor):
    _, processor = model_and_processor
    inputs = encode_prompt(processor, _prompt(), data=DataConfig())
    text = processor.tokenizer.decode(inputs.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert text.endswith("Find x. " + FORMAT_PROMPT + "<|im_end|>\n<|im_start|>assistant\n")
    # 224x224 -> the tiny processor's 112x112 -> 8x8 patches -> 16 tokens after the 2x2 merge
    assert inputs.image_grid_thw.tolist() == [[1, 8, 8]] and inputs.pixel_values.shape == (64, 1176)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (inputs.input_ids == image_pad).sum() == 16 == inputs.mm_token_type_ids.sum()
    assert torch.equal(inputs.mm_token_type_ids.bool(), inputs.input_ids == image_pad)
    pixel_values, grid = image_inputs(processor, Image.new("RGB", (224, 224), "white"))
    assert torch.equal(pixel_values, inputs.pixel_values) and torch.equal(grid, inputs.image_grid_thw)


def test_encode_prompt_errors_name_the_prompt(model_and_processor):
    _, processor = model_and_processor
    with pytest.raises(ValueError, match="prompt geo-4: problem must contain exactly one <image>"):
        encode_prompt(processor, _prompt(problem="Find x.", id="geo-4"), data=DataConfig())
    with pytest.raises(ValueError, match="geo-5 cannot be decoded"):
        encode_prompt(processor, _prompt(image=b"\x89PNG broken", id="geo-5"), data=DataConfig())
    with pytest.raises(PromptTooLong, match="prompt geo-6 has 111 tokens, over data.max_prompt_tokens=64"):
        encode_prompt(processor, _prompt(id="geo-6"), data=DataConfig(max_prompt_tokens=64))


# ----------------------------------------------------------------------------------- batch forward
def test_batch_logits_equal_single_sequence_logits(model_and_processor):
    model, processor = model_and_processor
    inputs = encode_prompt(processor, _prompt(), data=DataConfig())
    completions = [torch.tensor([40, 41, 42, 43, 44]), torch.tensor([50]), torch.tensor([60, 61, 62])]
    batch = model_inputs(inputs, completions, pad_id=processor.tokenizer.pad_token_id)
    num_tokens = inputs.num_tokens
    assert batch["input_ids"].shape == (3, num_tokens + 5) and batch["pixel_values"].shape == (3 * 64, 1176)
    assert batch["attention_mask"].sum(1).tolist() == [num_tokens + 5, num_tokens + 1, num_tokens + 3]
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 3
    with torch.no_grad():
        logits = model(**batch).logits
        for i, completion in enumerate(completions):
            single = model(**model_inputs(inputs, [completion], pad_id=0)).logits[0]
            length = num_tokens + len(completion)
            torch.testing.assert_close(logits[i, :length], single, atol=1e-5, rtol=1e-5)


def test_batch_logits_equal_what_generate_scored(model_and_processor):
    model, processor = model_and_processor
    inputs = encode_prompt(processor, _prompt(), data=DataConfig())
    with torch.no_grad():
        out = model.generate(**inputs.generate_kwargs(), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                             output_logits=True, return_dict_in_generate=True)
        completion = out.sequences[0, inputs.num_tokens:]
        generated = torch.stack(out.logits, dim=1)[0]  # [T, vocab]
        batch = model_inputs(inputs, [torch.tensor([7, 8]), completion], pad_id=processor.tokenizer.pad_token_id)
        logits = model(**batch).logits[1, inputs.num_tokens - 1:inputs.num_tokens - 1 + len(completion)]
    assert len(completion) == 10
    torch.testing.assert_close(logits, generated, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits.argmax(-1), completion)  # greedy picked the argmax of exactly these logits
