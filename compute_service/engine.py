"""InferenceEngine: requests in, tokens out, over one shared paged KV pool.

Thin glue (as nano-vllm's LLMEngine): the Scheduler decides who runs, the KVCacheManager speaks
for the blocks (the memory side keeps the tables: the memory service over gRPC, or an in-process
allocator its caller hands over, as bench.local_engine does), the ModelRunner runs the forward,
`sample` picks tokens. `step()` runs one forward: every running request's next row (a decode's
token, or the next chunk of a prompt); `generate()` and `stream()` are loops over it.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Callable, Iterator

from common.sampling_params import FieldError, SamplingParams, TokenLogprobs, new_seed, sample_seed, validate_request
from common.structured_output import GrammarLimits, get_grammar_compiler
from common.tokenizer import get_tokenizer
from compute_service.baselines import RecomputeRunner, RecomputeScheduler
from compute_service.config import EngineConfig
from compute_service.grammar_masks import GrammarMasks
from compute_service.hugepages import move_to_hugepages
from compute_service.kv_cache import KVCache
from compute_service.kv_manager import KVCacheManager, Reservation
from compute_service.model_runner import ModelRunner
from compute_service.native import load_extension
from compute_service.outputs import EngineLoad, GenerationResult, RequestOutput, StepStats, to_result
from compute_service.prefix_view import NoPrefixIndex, PrefixCacheView
from compute_service.sampling import sample, token_logprobs
from compute_service.scheduler import Scheduler, SchedulerConfig
from compute_service.sequence import FinishReason, Sequence, SequenceStatus
from compute_service.weights import load_model
from memory_service.contract import MemoryConnection, MemoryLost

log = logging.getLogger(__name__)


class InferenceEngine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        connect_memory: Callable[[int, int], MemoryConnection] | None = None,
        **overrides,
    ) -> None:
        """`connect_memory(num_blocks, block_size)` opens the memory connection that keeps the
        pool's block tables: the memory service's client (compute_service.server) or, in
        benchmarks and tests, an in-process allocator (bench.local_engine). The no-cache
        baseline needs none."""
        config = config or EngineConfig(**overrides)
        config.validate()
        self.config = config
        self.tokenizer = get_tokenizer()
        self.model = load_model(config.model, config.device, config.torch_dtype)
        self.model.set_backends(config.attention_backend, config.linear_backend, config.fused_decode == "on")
        if config.on_cpu:
            self.model.set_weight_format(config.weight_format)
            move_to_hugepages(self.model)
            load_extension()  # the C++ kernels now (a stale cache compiles for ~a minute), not in the first request
        self.max_model_len = self.model.config.context_length
        cfg = self.model.config
        paged = config.mode == "paged"
        chunked = config.chunked_prefill == "on"
        scheduler_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            # without chunks a prompt runs whole: the budget holds the longest beside every decode
            max_num_batched_tokens=config.max_num_batched_tokens
            if chunked
            else max(config.max_num_batched_tokens, self.max_model_len + config.max_num_seqs),
            chunked_prefill=chunked,
            long_prefill_token_threshold=config.long_prefill_token_threshold,
            watermark_blocks=0,
            headroom_blocks_per_seq=config.headroom_blocks_per_seq if paged else 0,
        )
        self.kv: KVCacheManager | None = None
        self.kv_cache: KVCache | None = None
        self.num_blocks, self.block_size = 0, 1  # the pool's shape (none in the no-cache baseline)
        if config.mode == "no-cache":
            self.scheduler: Scheduler = RecomputeScheduler(scheduler_config)
            self.runner = RecomputeRunner(self.model, config.device)
        else:
            if connect_memory is None:
                raise ValueError("a KV cache needs connect_memory (the memory service's client, or bench.local_engine)")
            num_blocks, block_size = self.num_blocks, self.block_size = config.pool_shape(self.max_model_len)
            scheduler_config.watermark_blocks = max(1, num_blocks // 100) if paged else 0
            self.kv_cache = KVCache(
                cfg.n_layer, cfg.n_head, cfg.head_dim, num_blocks, block_size, config.device, config.torch_dtype
            )
            prefix = (
                PrefixCacheView(block_size, config.cache_namespace, num_blocks)
                if config.caches_prefixes
                else NoPrefixIndex()
            )
            reservation = Reservation(None if paged else config.reserve, self.max_model_len)
            memory: MemoryConnection = connect_memory(num_blocks, block_size)
            self.kv = KVCacheManager(memory, num_blocks, block_size, prefix, reservation)
            self.scheduler = Scheduler(scheduler_config, self.kv)
            self.runner = ModelRunner(self.model, self.kv_cache, config.device)
        self.stats = StepStats()
        self.grammar_masks = GrammarMasks(self.model.config.vocab_size, self.tokenizer.eot_token_id)
        self._requests: dict[str, Sequence] = {}  # every unreported sequence, by its id
        self._groups: dict[str, list[Sequence]] = {}  # a request's samples, by the request's id
        self._ids = itertools.count()

    # ---- requests ------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def validate_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        output_token_ids: list[int] = (),
        sample_outputs: dict[int, list[int]] | None = None,
    ) -> None:
        """ValueError naming the field, for anything a client can get wrong: the shared request
        rules, then whether this replica's pool can ever hold the request. `output_token_ids`
        are tokens already generated for it (elsewhere: a request continued after a fault);
        `sample_outputs` the same for a request with n > 1: {sample index: its tokens so far} for
        the samples still to finish."""
        vocab_size = self.model.config.vocab_size
        validate_request(prompt_token_ids, params, self.max_model_len, vocab_size)
        if params.n > 1 and output_token_ids:
            raise ValueError("output_token_ids is for n = 1; continue samples of n > 1 with sample_outputs")
        for index, outputs in (sample_outputs or {0: output_token_ids}).items():
            if not isinstance(index, int) or not 0 <= index < params.n:
                raise ValueError(f"sample index {index!r} is not in [0, n={params.n})")
            if len(outputs) > params.max_new_tokens:
                raise ValueError(f"output_token_ids has {len(outputs)} tokens, more than max_new_tokens")
            if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in outputs):
                raise ValueError(f"output token ids must be integers in [0, {vocab_size})")
        if sample_outputs is not None and not sample_outputs:
            raise ValueError("sample_outputs names no sample to continue")
        if params.n > self.config.max_num_seqs:
            raise ValueError(
                f"n={params.n} is more than this replica runs at once (max_num_seqs={self.config.max_num_seqs})"
            )
        kv = self.kv
        if kv is not None and not kv.fits_pool(len(prompt_token_ids), params.max_new_tokens):
            longest = len(prompt_token_ids) + params.max_new_tokens
            reserve = kv.reservation.tokens(len(prompt_token_ids), params.max_new_tokens)
            raise ValueError(
                f"request needs {max(longest, reserve)} KV slots; the pool holds {kv.num_blocks * kv.block_size}"
            )

    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Validate and queue a request; returns its id."""
        params = params or SamplingParams()
        prompt_token_ids = self.encode_prompt(prompt)
        self.validate_request(prompt_token_ids, params)
        return self.enqueue_validated(prompt_token_ids, params, request_id, grammars=self.compile_grammar(params))

    def compile_grammar(
        self,
        params: SamplingParams,
        output_token_ids: list[int] = (),
        sample_outputs: dict[int, list[int]] | None = None,
        limits: GrammarLimits | None = None,
    ) -> dict[int, object] | None:
        """Each sample's grammar matcher, advanced over the tokens it already has (a request
        continued after a fault; the arguments as enqueue_validated's), by sample index; None
        without a constraint. FieldError for a constraint that does not compile or tokens that do
        not follow it. Blocking (a cached grammar compiles in microseconds, a new one up to its
        fuel limits; replaying tokens costs microseconds each): the service calls it off the
        engine thread. `limits`: the service's grammar settings."""
        if params.structured_output is None:
            return None
        compiler = get_grammar_compiler(self.model.config.vocab_size, limits)
        if sample_outputs is None:
            sample_outputs = {0: list(output_token_ids)} if params.n == 1 else {i: [] for i in range(params.n)}
        matchers = {}
        for index, outputs in sample_outputs.items():
            matcher = compiler.matcher(params.structured_output)
            if not matcher.consume_tokens(list(outputs)):
                raise FieldError("output_token_ids", "output_token_ids do not follow the request's structured_output")
            matchers[index] = matcher
        return matchers

    def enqueue_validated(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        output_token_ids: list[int] = (),
        sample_outputs: dict[int, list[int]] | None = None,
        grammars: dict[int, object] | None = None,
    ) -> str:
        """Queue a request that `validate_request` has already accepted (the service validates
        on arrival, before it reaches the engine thread; checking again would be a second rule
        set to keep in step). With `output_token_ids` the request continues where another
        replica stopped: they are recomputed with the prompt, count towards max_new_tokens and
        stop strings, and are not generated again; if they already end the request (EOS, a stop
        string, the length), it ends at once with no new token. `sample_outputs` does the same
        per sample of a request with n > 1.

        A request with n samples is fanned out here, as vLLM v1 does: n sequences of their own
        (sample i draws with seed sample_seed(seed, i)), reported under the request's id. The
        prompt is computed once with prefix caching on (paged mode): the first sample to be
        admitted computes it, and admission holds the others until its blocks are committed, then
        they find every full block of the prompt in the prefix cache and compute only the one
        holding its last token. With caching off (or in the baselines) each sample computes it.
        `grammars` (compile_grammar's answer: each sample's matcher, advanced over the tokens it
        already has) constrain the samples."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        seed = params.seed if params.seed is not None else new_seed()
        if sample_outputs is None:
            sample_outputs = {0: list(output_token_ids)} if params.n == 1 else {i: [] for i in range(params.n)}
        samples = [
            Sequence(
                request_id if i == 0 else f"{request_id}#{i}",
                prompt_token_ids,
                params,
                sample_seed(seed, i),
                token_ids=[*prompt_token_ids, *outputs],
                group_id=request_id,
                index=i,
            )
            for i, outputs in sorted(sample_outputs.items())
        ]
        if request_id in self._groups or any(s.request_id in self._requests for s in samples):
            raise ValueError(f"request_id {request_id!r} is already in use (or one of its samples' ids)")
        for seq in samples if grammars is not None else ():
            seq.grammar = grammars[seq.index]
        self._groups[request_id] = samples
        for seq in samples:
            self._requests[seq.request_id] = seq
            self.scheduler.add(seq)
            if seq.output_token_ids:
                reason = self._finish_reason(seq, seq.output_token_ids[-1])
                if reason is not None:
                    self.scheduler.finish(seq, reason)  # reported by the next step
        return request_id

    def reset_prefix_cache(self) -> None:
        """Start cold: forget what this replica believes is cached (bench.local_engine also
        resets its allocator). Benchmarks call it between rounds so one round's blocks are not
        the next one's hits."""
        if self.kv is not None:
            self.kv.reset_prefix_cache()

    def abort(self, request_id: str) -> bool:
        """Stop a request (every sample of it); its blocks are freed in the next step's memory call."""
        running = [s for s in self._groups.get(request_id, ()) if not s.is_finished]
        for seq in running:
            self.scheduler.finish(seq, FinishReason.ABORT)
        return bool(running)

    def is_active(self, request_id: str) -> bool:
        """Some sample of the request has not been reported finished yet."""
        return request_id in self._groups

    def unfinished_ids(self) -> list[str]:
        """Ids of the requests with a sample still running or waiting."""
        return [rid for rid, seqs in self._groups.items() if any(not s.is_finished for s in seqs)]

    def has_unfinished(self) -> bool:
        """True while any request runs, waits, has blocks to return, or has an unreported end
        (a request that ended outside a step, by abort or on arrival, is reported by the next)."""
        return bool(self._requests) or self.scheduler.has_work()

    def forget_memory(self) -> int:
        """The memory side lost this replica's pool: every running request goes back to the queue
        to be recomputed in the next one (compute_service.async_engine). Returns how many ran."""
        return self.scheduler.forget_memory()

    def load(self) -> EngineLoad:
        """Counters for the Info call and the benchmarks."""
        sched = self.scheduler
        return EngineLoad(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            num_preemptions=sched.num_preemptions,
            num_schedule_rounds=sched.num_schedule_rounds,
            num_memory_calls=self.kv.num_calls if self.kv is not None else 0,
        )

    # ---- stepping ------------------------------------------------------------------------
    def step(self, before_forward: Callable[[], None] | None = None) -> list[RequestOutput]:
        """Run one forward over the scheduled batch and append one token to each sequence.
        `before_forward` runs once the memory call is done (the service hands out the previous
        step's tokens there, so that work overlaps the forward rather than the memory call)."""
        outputs = [self._finished_output(s) for s in list(self._requests.values()) if s.is_finished]
        batch = self.scheduler.schedule()
        if before_forward is not None:
            before_forward()
        if batch is None:
            self._flush_frees()
            self._forget(outputs)
            return outputs
        prepared = self.runner.prepare(batch)
        self.scheduler.plan_next(batch)  # the next step's memory call travels during this forward
        masks = self.grammar_masks.start([s.grammar for s in batch.sampling_seqs])  # filled during the forward
        logits = self.runner.execute(prepared)
        for seq, num_new, samples in zip(batch.seqs, batch.num_new_tokens, batch.samples, strict=True):
            if not samples and seq.status is SequenceStatus.RUNNING:  # a chunk: not preempted meanwhile
                seq.num_computed_tokens += num_new
        seqs = batch.sampling_seqs  # the logits' rows
        params = [s.params for s in seqs]
        eos = self.tokenizer.eot_token_id
        tokens, failures = sample(
            logits,
            params,
            [s.seed for s in seqs],
            [s.num_tokens for s in seqs],
            seqs,
            eos,
            lambda raw: self.grammar_masks.apply(raw, masks),
        )
        logprobs = token_logprobs(logits, params, tokens)  # the model's raw distribution
        now = time.perf_counter()
        self._record_stats(len(batch.seqs))
        for row, (seq, token, token_lp) in enumerate(zip(seqs, tokens, logprobs, strict=False)):
            if seq.is_finished:  # a sample of a request that failed earlier in this loop
                continue
            if row in failures:
                outputs += self._fail_request(seq, failures[row])
                continue
            try:
                if seq.grammar is not None and not seq.grammar.consume_token(token):
                    error = seq.grammar.get_error() or "the grammar allowed no token here"
                    outputs += self._fail_request(seq, f"structured_output could not be followed: {error[:300]}")
                    continue
                outputs.append(self._append_token(seq, token, token_lp, now))
            except Exception:  # one request's data must not end the step for the others
                log.exception("request %s: processing its output failed; failing it alone", seq.group_id)
                outputs += self._fail_request(
                    seq, "the engine failed while processing this request's output (logged on the replica)"
                )
        if not self.scheduler.running and not self.scheduler.waiting:
            self._flush_frees()  # idle: give the blocks back now, not at the next step
        self._forget(outputs)
        return outputs

    def _append_token(self, seq: Sequence, token: int, token_lp: TokenLogprobs | None, now: float) -> RequestOutput:
        """Append one sampled token to `seq`, end it if the token finishes it, and say so."""
        if self.config.fault_injection_salt and seq.params.cache_salt == self.config.fault_injection_salt:
            raise RuntimeError("injected row fault (fault_injection_salt)")
        token_lps = [token_lp] if token_lp is not None else []
        if seq.status is SequenceStatus.RUNNING:  # not preempted meanwhile
            seq.num_computed_tokens = seq.num_tokens
        seq.token_ids.append(token)  # its grammar, if any, has consumed it (step)
        seq.first_token_time = seq.first_token_time or now
        reason = self._finish_reason(seq, token)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            return self._finished_output(seq, [token], token_lps)
        return RequestOutput(seq.request_id, [token], False, group_id=seq.group_id, index=seq.index, logprobs=token_lps)

    def _fail_request(self, seq: Sequence, reason: str) -> list[RequestOutput]:
        """End every sample of `seq`'s request with FinishReason.ERROR (a request fails whole);
        their blocks go back in the next memory call, as an abort's do."""
        outputs = []
        for member in self._groups.get(seq.group_id, [seq]):
            if not member.is_finished:
                member.error = reason
                self.scheduler.finish(member, FinishReason.ERROR)
                outputs.append(self._finished_output(member))
        return outputs

    def _flush_frees(self) -> None:
        """Return finished sequences' blocks now. If the memory side is lost meanwhile, so are
        those blocks (with the whole pool): this step's outputs still go out, and the connection
        reports the loss to whoever owns it (it is flagged `lost`)."""
        try:
            self.scheduler.flush_frees()
        except MemoryLost as exc:
            log.warning("returning blocks failed: %s", exc)  # the reason, for whoever recovers the link

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if token == self.tokenizer.eot_token_id and not params.ignore_eos:
            return FinishReason.EOS
        output = seq.output_token_ids
        if token in params.stop_token_ids:  # masked until min_tokens: it cannot come sooner
            seq.output_text = self.tokenizer.decode(output[:-1])  # not in the text, as EOS
            return FinishReason.STOP
        if params.stop and len(output) >= params.min_tokens:
            text = self.tokenizer.decode(output)
            # Only a stop string that ends past the first min_tokens tokens' text counts.
            floor = len(self.tokenizer.decode(output[: params.min_tokens])) if params.min_tokens else 0
            hits = [i for s in params.stop if (i := text.find(s, max(floor - len(s) + 1, 0))) >= 0]
            if hits:
                seq.output_text = text[: min(hits)]
                return FinishReason.STOP
        if seq.grammar is not None and (token == self.tokenizer.eot_token_id or seq.grammar.is_stopped()):
            # The grammar is complete: EOS was allowed only there (ignore_eos or not), or nothing can follow.
            seq.output_text = self.tokenizer.decode(output[:-1] if token == self.tokenizer.eot_token_id else output)
            return FinishReason.STOP
        if len(output) >= params.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _finished_output(
        self, seq: Sequence, new_tokens: list[int] | None = None, logprobs: list[TokenLogprobs] | None = None
    ) -> RequestOutput:
        if seq.finish_reason is FinishReason.ERROR:  # no decode: it may be what failed
            return RequestOutput(
                seq.request_id,
                [],
                True,
                seq.finish_reason.value,
                seq,
                group_id=seq.group_id,
                index=seq.index,
                error=seq.error,
            )
        if seq.finish_reason is not FinishReason.STOP:
            ids = seq.output_token_ids
            if seq.finish_reason is FinishReason.EOS:
                ids = ids[:-1]
            seq.output_text = self.tokenizer.decode(ids)
        return RequestOutput(
            seq.request_id,
            new_tokens or [],
            True,
            seq.finish_reason.value,
            seq,
            group_id=seq.group_id,
            index=seq.index,
            logprobs=logprobs or [],
        )

    def _forget(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self._requests.pop(out.request_id, None)
                group = self._groups.get(out.group_id, ())
                if all(s.request_id not in self._requests for s in group):
                    self._groups.pop(out.group_id, None)

    def _record_stats(self, num_running: int) -> None:
        st = self.stats
        st.num_forwards += 1
        st.sum_running += num_running
        st.peak_running = max(st.peak_running, num_running)
        kv = self.kv.last_stats if self.kv is not None else None
        if kv is not None and kv.num_used_blocks:
            st.peak_used_blocks = max(st.peak_used_blocks, kv.num_used_blocks)
            st.sum_utilization += kv.utilization
            st.num_utilization_samples += 1

    # ---- convenience loops ---------------------------------------------------------------
    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[GenerationResult]:
        """Run every prompt to completion (continuously batched); results in prompt order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list, strict=False)]
        done: dict[str, list[Sequence]] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    done.setdefault(out.group_id, []).append(out.sequence)
        results = []
        for request_id in ids:
            samples = [to_result(s) for s in sorted(done[request_id], key=lambda s: s.index)]
            results.append(samples[0])
            if len(samples) > 1:
                samples[0].samples = samples
        return results

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield one request's tokens as they are generated, every sample's (others in the
        engine advance too); ends when all its samples have finished."""
        request_id = self.add_request(prompt, params)
        remaining = (params or SamplingParams()).n
        while remaining:
            for out in self.step():
                if out.group_id == request_id:
                    yield out
                    remaining -= out.finished
