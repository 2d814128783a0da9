"""Batched KV-cached generation with one adapter per request and continuous batching
(train/serving/engine.py): every request's answer equals that request generated alone."""

import pytest
import torch
from serve_helpers import greedy_alone, lora_adapter, tiny_llm

from train.serving.engine import BatchedGenerator, GenerationRequest

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    model = tiny_llm(VOCAB)
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        lora_adapter(model, name, seed=i)
    return model


def random_requests(count: int, seed: int = 1) -> list[GenerationRequest]:
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(count):
        length = int(torch.randint(1, 14, (1,), generator=generator))
        requests.append(GenerationRequest(
            prompt_ids=torch.randint(3, VOCAB, (length,), generator=generator).tolist(),
            adapter=[None, "alpha", "beta", "gamma"][i % 4], max_new_tokens=[3, 9, 5, 1, 6][i % 5]))
    return requests


@pytest.mark.parametrize("max_batch", [3, 32])
def test_mixed_adapter_batch_equals_each_request_alone(model, max_batch):
    requests = random_requests(7)
    BatchedGenerator(model, max_batch=max_batch).generate(requests)
    for request in requests:
        assert request.tokens == greedy_alone(model, request.prompt_ids, request.adapter, request.max_new_tokens, None)
        assert request.finish_reason == "length"


def test_adapters_change_answers(model):
    """A guard for the test above: the adapters really differ, so routing a row wrongly would show."""
    prompt = list(range(5, 15))
    answers = {name: tuple(greedy_alone(model, prompt, name, 8, None)) for name in [None, "alpha", "beta", "gamma"]}
    assert len(set(answers.values())) == 4


def test_requests_join_between_steps_and_leave_when_done(model):
    generator = BatchedGenerator(model, max_batch=4)
    first = generator.submit(GenerationRequest(prompt_ids=[5, 6, 7], adapter="alpha", max_new_tokens=6))
    generator.step()
    generator.step()
    late = generator.submit(GenerationRequest(prompt_ids=list(range(10, 30)), adapter="beta", max_new_tokens=3))
    finished = generator.step()  # the late request joins the running batch and is decoded with it
    assert len(generator.running) == 2 and finished == []
    finished = generator.step()
    assert finished == [late] and generator.running == [first]
    # the late request's long prompt columns are no one's any more: the cache shrinks back
    assert generator.mask.shape[1] == len(first.prompt_ids) + len(first.tokens) - 1
    while generator.busy():
        generator.step()
    assert generator.cache is None and generator.running == []
    for request in (first, late):
        assert request.tokens == greedy_alone(model, request.prompt_ids, request.adapter, request.max_new_tokens, None)


def test_stop_token_and_stop_rule(model):
    reference = greedy_alone(model, [9, 8, 7], "gamma", 8, None)
    by_id = GenerationRequest(prompt_ids=[9, 8, 7], adapter="gamma", max_new_tokens=8, stop_ids=(reference[2],))
    by_rule = GenerationRequest(prompt_ids=[9, 8, 7], adapter="gamma", max_new_tokens=8,
                                stop=lambda tokens: len(tokens) == 4)
    streamed: list[int] = []
    by_rule.on_token = streamed.append
    BatchedGenerator(model).generate([by_id, by_rule])
    first_stop = reference.index(reference[2])
    assert by_id.tokens == reference[:first_stop] and by_id.finish_reason == "stop"
    assert by_rule.tokens == reference[:4] == streamed and by_rule.finish_reason == "stop"


def test_sampling_is_per_request_and_seeded(model):
    def sampled(batch_with):
        request = GenerationRequest(prompt_ids=[4, 5, 6], adapter="beta", max_new_tokens=10, temperature=1.5, seed=7)
        BatchedGenerator(model).generate([request, *batch_with])
        return request.tokens

    alone = sampled([])
    assert alone == sampled(random_requests(5, seed=3))  # other rows do not change this row's draws
    assert alone != greedy_alone(model, [4, 5, 6], "beta", 10, None)


def test_prompt_embeddings_as_an_mllm_gives_them(model):
    """The MLLM hands spliced embeddings (image tokens marked by vision_mask): same answer as the ids."""
    ids = [11, 12, 13, 14]
    embeds = model.get_input_embeddings()(torch.tensor(ids)).detach()
    by_embeds = GenerationRequest(prompt_embeds=embeds, vision_mask=torch.tensor([0, 1, 1, 0]).bool(),
                                  adapter="alpha", max_new_tokens=5)
    by_ids = GenerationRequest(prompt_ids=ids, adapter="alpha", max_new_tokens=5)
    BatchedGenerator(model).generate([by_embeds, by_ids])
    assert by_embeds.tokens == by_ids.tokens == greedy_alone(model, ids, "alpha", 5, None)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="exactly one"):
        GenerationRequest()
    with pytest.raises(ValueError, match="empty"):
        GenerationRequest(prompt_ids=[])
    with pytest.raises(ValueError, match="max_batch"):
        BatchedGenerator(tiny_llm(VOCAB), max_batch=0)


def test_pool_pages_adapters_and_answers_equal_attached_adapters(model, tmp_path):
    """With an mm.AdapterPool of 2 slots serving 3 adapters, a batch never names more than 2 adapters (the
    rest wait), adapters are evicted and paged back, and every answer equals the attached adapter's."""
    import mm

    pool = mm.AdapterPool(model, targets=["q_proj", "v_proj", "down_proj"], r_max=4, slots=2)
    for name in ["alpha", "beta", "gamma"]:
        mm.save_adapters(model, tmp_path / f"{name}.safetensors", [name])
        pool.register(name, tmp_path / f"{name}.safetensors")
    generator = BatchedGenerator(model, max_batch=8, pool=pool)
    requests = random_requests(7, seed=5)
    for request in requests:
        generator.submit(request)
    widest = 0
    while generator.busy():
        generator.step()
        widest = max(widest, len({r.adapter for r in generator.running} - {None}))
    assert widest == 2 and pool.evictions > 0
    for request in requests:
        assert request.tokens == greedy_alone(model, request.prompt_ids, request.adapter, request.max_new_tokens, None)


def test_a_cancelled_request_leaves_at_the_next_step(model):
    generator = BatchedGenerator(model)
    gone = generator.submit(GenerationRequest(prompt_ids=[3, 4], adapter="alpha", max_new_tokens=20))
    stays = generator.submit(GenerationRequest(prompt_ids=[5, 6, 7], adapter="beta", max_new_tokens=4))
    never = generator.submit(GenerationRequest(prompt_ids=[8], adapter="beta", max_new_tokens=4))
    never.cancelled = True  # cancelled while waiting: never admitted
    generator.waiting.remove(never)
    generator.waiting.insert(0, never)
    assert generator.step() == [never] and never.finish_reason == "cancelled" and never.tokens == []
    assert generator.running == [gone, stays]
    gone.cancelled = True
    assert generator.step() == [gone] and gone.finish_reason == "cancelled"
    while generator.busy():
        generator.step()
    assert stays.tokens == greedy_alone(model, [5, 6, 7], "beta", 4, None)


def test_mllm_requests_with_images_equal_the_mllms_own_generate():
    """LLaVA-style MLLM (tiny CLIP + projector + LLM with two LoRA adapters): image and text-only requests
    for different adapters in one batch answer as LlavaModel.generate does with that adapter alone."""
    import mm
    from data.fake_instruct import demo_texts
    from data.instruct import ChatTemplate
    from encoders.clip import create_clip
    from encoders.llm import IMAGE_TOKEN, TinyLLMConfig, word_tokenizer
    from encoders.llm import tiny_llm as tiny_llm_of
    from heads.mllm_projector import MLLMProjector
    from train.serving.engine import mllm_request
    from train.tasks.mllm_model import LlavaModel

    tok = word_tokenizer([*demo_texts(), *ChatTemplate().texts()])
    llm = tiny_llm_of(len(tok), TinyLLMConfig(hidden_size=32, intermediate_size=64, layers=2, heads=4, kv_heads=2),
                      seed=0).eval()
    llava = LlavaModel(create_clip("tiny-test", seed=0).model, MLLMProjector("mlp2x_gelu", 32, 32), llm,
                       image_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), pad_id=tok.pad_token_id,
                       eos_id=tok.eos_token_id).eval()
    for i, name in enumerate(["alpha", "beta"]):
        lora_adapter(llm, name, seed=20 + i, targets=("q_proj", "v_proj"))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    asks = [(f"{IMAGE_TOKEN} what is this", images[0], "alpha"), ("what is this", None, "beta"),
            (f"{IMAGE_TOKEN} what", images[1], "beta")]
    requests = [mllm_request(llava, tok(text, add_special_tokens=False)["input_ids"], image, adapter=name,
                             max_new_tokens=6) for text, image, name in asks]
    BatchedGenerator(llm).generate(requests)
    for (text, image, name), request in zip(asks, requests, strict=True):
        mm.set_active(llm, [name])
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        alone = llava.generate(ids, torch.ones_like(ids), None if image is None else image[None],
                               torch.tensor([image is not None]), max_new_tokens=6)[0]
        assert request.tokens == alone
    assert requests[0].vision_mask.sum() > 0 and requests[1].vision_mask.sum() == 0
