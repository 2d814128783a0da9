"""Batched KV-cached generation with one adapter per request and continuous batching.

A transformers causal LM (or the LLM inside the MLLM of ``train/tasks/mllm_model.py``, given prompt
embeddings) decodes every running request in ONE forward per step, each row routed to its own adapter
through ``mm.route(row_adapters=...)``. Requests join between decode steps (their prompts are prefilled
together, left-padded, and their KV cache rows are appended to the running batch) and leave as soon as
they finish (their rows are dropped from the cache), so a short request never waits for a long one.

The running cache is the model's own ``DynamicCache``; its per-layer ``keys``/``values`` are
(batch, heads, time, dim) tensors that are left-padded to the longest row. ``mask`` marks the real
(non-pad) time steps of each row and every row carries its own position ids, so a padded row computes
what it would compute alone. Columns that are padding for every row are trimmed when rows leave.

With an ``mm.AdapterPool`` (``pool=``) the rows go through the pool's device slots instead of attached
adapters: any number of adapters registered, at most ``pool.slots`` of them in one batch (the others'
requests wait until rows leave), the least recently used paged out.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mm.route import route


@dataclass
class GenerationRequest:
    """One prompt: ``prompt_ids`` (token ids) or ``prompt_embeds`` ((tokens, width), e.g. an MLLM prompt
    with spliced image tokens, with ``vision_mask`` marking those tokens); ``adapter`` None = the base."""

    prompt_ids: list[int] | None = None
    adapter: str | None = None
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    seed: int | None = None  # sampling seed, for reproducible answers when temperature > 0
    stop_ids: tuple[int, ...] = ()  # token ids that end the answer (not included in it)
    stop: Callable[[list[int]], bool] | None = None  # e.g. "the decoded answer contains a stop string"
    on_token: Callable[[int], None] | None = None  # called with each new token id (streaming)
    prompt_embeds: torch.Tensor | None = None
    vision_mask: torch.Tensor | None = None
    tokens: list[int] = field(default_factory=list)  # the answer so far
    finish_reason: str | None = None  # "stop", "length" or "cancelled" once done
    request_id: int = -1
    cancelled: bool = False  # set from any thread (the client went away): the row leaves at the next step

    def __post_init__(self) -> None:
        if (self.prompt_ids is None) == (self.prompt_embeds is None):
            raise ValueError("give exactly one of prompt_ids and prompt_embeds")
        if self.prompt_length == 0:
            raise ValueError("the prompt is empty")
        self.generator = None
        if self.temperature > 0:  # its own generator: other rows' draws never shift this row's
            self.generator = torch.Generator()
            if self.seed is None:
                self.generator.seed()  # fresh entropy, leaving torch's global generator alone
            else:
                self.generator.manual_seed(self.seed)

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids) if self.prompt_ids is not None else int(self.prompt_embeds.shape[0])


class BatchedGenerator:
    """Continuous batching over ``model`` (a transformers causal LM with ``mm`` adapters attached).

    ``submit`` queues requests; each ``step`` admits queued requests up to ``max_batch`` running rows
    (one batched prefill), then decodes one token for every running row (one batched forward), and
    returns the requests that finished in it. ``generate`` runs a list of requests to completion.
    """

    def __init__(self, model: nn.Module, *, max_batch: int = 32, pool=None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.pool = pool  # an mm.AdapterPool: adapters paged into its device slots instead of attached ones
        self.embed = model.get_input_embeddings()
        self.waiting: list[GenerationRequest] = []
        self.running: list[GenerationRequest] = []
        self.cache = None  # the running rows' DynamicCache
        self.mask: torch.Tensor | None = None  # (running, time) 1 = real token
        self.positions: torch.Tensor | None = None  # (running,) position id of each row's next token
        self.last: torch.Tensor | None = None  # (running,) each row's newest token
        self._ids = itertools.count()

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        request.request_id = next(self._ids)
        self.waiting.append(request)
        return request

    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        for request in requests:
            self.submit(request)
        while self.busy():
            self.step()
        return requests

    @torch.no_grad()
    def step(self) -> list[GenerationRequest]:
        """Admit waiting requests, then decode one token for every running row; returns finished requests."""
        finished = [r for r in self.waiting if r.cancelled]  # cancelled before they ran: done, never admitted
        for request in finished:
            request.finish_reason = "cancelled"
        self.waiting = [r for r in self.waiting if not r.cancelled]
        joining = self._admit()
        if joining:
            finished += self._prefill(joining)
        if self.running:
            finished += self._decode()
        return finished

    def _admit(self) -> list[GenerationRequest]:
        """Waiting requests that join now, in order, up to ``max_batch`` rows and, with a pool, as long as
        the batch names no more adapters than the pool has slots (the others wait for rows to leave)."""
        room = self.max_batch - len(self.running)
        if self.pool is None:
            joining, self.waiting = self.waiting[:room], self.waiting[room:]
            return joining
        adapters = {r.adapter for r in self.running} - {None}
        joining, later = [], []
        for request in self.waiting:
            named = adapters | ({request.adapter} - {None})
            if len(joining) < room and len(named) <= self.pool.slots:
                joining.append(request)
                adapters = named
            else:
                later.append(request)
        self.waiting = later
        return joining

    def _routed(self, requests: list[GenerationRequest], token_masks: dict[str, torch.Tensor]):
        names = [r.adapter for r in requests]
        if self.pool is None:
            return route(row_adapters=names, token_masks=token_masks)
        return route(pool=self.pool, row_slots=self.pool.acquire(names), token_masks=token_masks)

    # ------------------------------------------------------------------------------------------ prefill

    def _prefill(self, joining: list[GenerationRequest]) -> list[GenerationRequest]:
        width = max(r.prompt_length for r in joining)
        embeds, masks, visions = [], [], []
        for request in joining:
            pad = width - request.prompt_length
            row = (request.prompt_embeds.to(self.device, self.embed.weight.dtype) if request.prompt_embeds is not None
                   else self.embed(torch.tensor(request.prompt_ids, device=self.device)))
            embeds.append(torch.cat([row.new_zeros(pad, row.shape[-1]), row]))
            masks.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(request.prompt_length,
                                                                                   dtype=torch.long)]))
            vision = (request.vision_mask.bool().cpu() if request.vision_mask is not None
                      else torch.zeros(request.prompt_length, dtype=torch.bool))
            visions.append(torch.cat([torch.zeros(pad, dtype=torch.bool), vision]))
        mask = torch.stack(masks).to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        token_masks = {"vision": torch.stack(visions).to(self.device), "attention": mask.bool()}
        with self._routed(joining, token_masks):
            out = self.model(inputs_embeds=torch.stack(embeds), attention_mask=mask, position_ids=positions,
                             use_cache=True)
        tokens = self._pick(out.logits[:, -1], joining)
        self._join(joining, out.cache, mask, positions[:, -1] + 1, tokens)
        return self._record(tokens, first_row=len(self.running) - len(joining))

    def _join(self, joining: list[GenerationRequest], cache, mask: torch.Tensor, positions: torch.Tensor,
              tokens: torch.Tensor) -> None:
        if not self.running:
            self.running, self.cache, self.mask, self.positions, self.last = joining, cache, mask, positions, tokens
            return
        old_width, new_width = self.mask.shape[1], mask.shape[1]
        width = max(old_width, new_width)
        for old_layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
            old_layer.keys = torch.cat([_left_pad(old_layer.keys, width), _left_pad(new_layer.keys, width)])
            old_layer.values = torch.cat([_left_pad(old_layer.values, width), _left_pad(new_layer.values, width)])
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, tokens])
        self.running = self.running + joining

    # ------------------------------------------------------------------------------------------- decode

    def _decode(self) -> list[GenerationRequest]:
        rows = len(self.running)
        self.mask = torch.cat([self.mask, self.mask.new_ones(rows, 1)], dim=1)
        token_masks = {"vision": torch.zeros(rows, 1, dtype=torch.bool, device=self.device),
                       "attention": torch.ones(rows, 1, dtype=torch.bool, device=self.device)}
        with self._routed(self.running, token_masks):
            out = self.model(input_ids=self.last[:, None], attention_mask=self.mask,
                             position_ids=self.positions[:, None], cache=self.cache, use_cache=True)
        self.cache = out.cache
        self.positions = self.positions + 1
        self.last = self._pick(out.logits[:, -1], self.running)
        return self._record(self.last)

    def _pick(self, logits: torch.Tensor, requests: list[GenerationRequest]) -> torch.Tensor:
        """Each row's next token: argmax, or a draw at its own temperature from its own generator."""
        tokens = logits.argmax(-1)
        for i, request in enumerate(requests):
            if request.temperature > 0:
                probs = torch.softmax(logits[i].float().cpu() / request.temperature, dim=-1)
                tokens[i] = int(torch.multinomial(probs, 1, generator=request.generator))
        return tokens

    def _record(self, tokens: torch.Tensor, first_row: int = 0) -> list[GenerationRequest]:
        """Append the new token of running rows ``first_row``...; drop the rows that finished (returned)."""
        finished, keep = [], list(enumerate(self.running[:first_row]))
        for i, (request, token) in enumerate(zip(self.running[first_row:], tokens.tolist(), strict=True), first_row):
            if request.cancelled:
                request.finish_reason = "cancelled"
            elif token in request.stop_ids:
                request.finish_reason = "stop"
            else:
                request.tokens.append(token)
                if request.on_token is not None:
                    request.on_token(token)
                if request.stop is not None and request.stop(request.tokens):
                    request.finish_reason = "stop"
                elif len(request.tokens) >= request.max_new_tokens:
                    request.finish_reason = "length"
            (finished if request.finish_reason else keep).append((i, request))
        if finished:
            self._keep_rows([i for i, _ in keep])
            self.running = [r for _, r in keep]
        return [r for _, r in finished]

    def _keep_rows(self, rows: list[int]) -> None:
        if not rows:
            self.cache = self.mask = self.positions = self.last = None
            return
        index = torch.tensor(rows, device=self.device)
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        start = int((self.mask.sum(0) > 0).nonzero()[0])  # leading columns that no row uses any more
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]


def _left_pad(tensor: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    """``tensor`` with zeros put before it along ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def mllm_request(llava: nn.Module, prompt_ids: list[int], image: torch.Tensor | None = None,
                 **options) -> GenerationRequest:
    """A request for the LLaVA-style MLLM of ``train/tasks/mllm_model.py``: the prompt's ``<image>`` token
    replaced by the image's projected tokens (its ``splice``), marked in ``vision_mask`` for MM-LoRA.
    Generate it with ``BatchedGenerator(llava.llm)``; the answer stops at the MLLM's end token."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        inputs = llava.splice(ids, torch.ones_like(ids), None if image is None else image[None],
                              torch.tensor([image is not None]), side="left")
    return GenerationRequest(prompt_embeds=inputs["inputs_embeds"][0], vision_mask=inputs["vision_mask"][0],
                             stop_ids=(llava.eos_id,), **options)
