"""Translator backends (local transformers LM, OpenAI-compatible HTTP server) and output validation."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conan_hf.data.clr import build_clr_dataset, write_clr_dataset
from conan_hf.data.translate import (
    DEFAULT_PROMPT,
    LANGUAGE_NAMES,
    OpenAITranslator,
    TransformersTranslator,
    TranslationError,
    prompt_fragments,
)
from conan_hf.data.validate import TranslationValidator, script_ratio

# --------------------------------------------------------------------------------------------- tiny local causal LM

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "How tall is Mount Everest?", "Wie hoch ist der Mount Everest?", "what is the capital of peru",
    "¿Cuál es la capital de Perú?", "Translate the following search query into German.", "珠穆朗玛峰有多高？",
    "Quelle est la capitale du Pérou ?", "Reply with the translation only.",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random Llama causal LM with a freshly trained byte-level BPE tokenizer and a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<|pad|>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        # Large init spreads the logits, so greedy decoding has no near-ties that rounding could flip.
        initializer_range=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-lm")
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path


def _reference_generate(path, text, language, max_new_tokens):
    """Unbatched greedy generation written out by hand: template string -> ids -> generate -> decode new tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = DEFAULT_PROMPT.format(language=LANGUAGE_NAMES[language], text=text)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>assistant\n") and prompt in rendered
    ids = torch.tensor([tokenizer(rendered, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_transformers_translator_matches_unbatched_reference(tiny_lm_dir):
    texts = ["How tall is Mount Everest?", "what is the capital of peru", "hi", "Quelle est la capitale ?", "a b c"]
    translator = TransformersTranslator(str(tiny_lm_dir), batch_size=2, max_new_tokens=6, show_progress_bar=False)
    batched = translator.translate(texts, "de")
    assert translator.num_translated == len(texts)
    assert translator.tokenizer.padding_side == "left"
    # Left padding and length-sorted batches must not change any output: compare with one-at-a-time generation.
    expected = [_reference_generate(tiny_lm_dir, t, "de", 6) for t in texts]
    assert batched == expected
    assert len(set(batched)) > 1  # the random model does produce different outputs for different inputs


def test_transformers_translator_in_clr_build(tiny_lm_dir):
    """End to end: the builder drives the local LM, validates every output and accounts for every row."""
    rows = [{"id": f"q{i}", "query": q, "positive": f"passage {i}"} for i, q in enumerate(CORPUS[:6])]
    translator = TransformersTranslator(str(tiny_lm_dir), batch_size=4, max_new_tokens=5, show_progress_bar=False)
    dataset, report = build_clr_dataset(rows, {"en": 1, "de": 1, "zh": 1}, translator, seed=3, show_progress_bar=False)
    assert report.assigned == {"en": 2, "de": 2, "zh": 2}
    assert report.translated == 4 and report.untranslated == 2
    assert report.num_output_rows + report.num_rejected == len(rows)
    validator = translator.default_validator()
    produced = {ex["id"]: ex for ex in report.rejected_examples}
    for row in dataset:
        if row["language"] == "en":
            assert row["query"] == row["source_query"]
        else:
            assert validator.reason(row["source_query"], row["query"], row["language"]) is None
    for example in produced.values():
        assert example["reason"] == validator.reason(example["source"], example["output"], example["language"])
        assert example["output"] == _reference_generate(tiny_lm_dir, example["source"], example["language"], 5)


# ------------------------------------------------------------------------------- OpenAI-compatible local HTTP server


class _ChatServer:
    """A real HTTP server on 127.0.0.1 speaking the chat-completions format.

    The reply to a query is ``"DE> " + reversed(query)``. Queries starting with ``slow`` stall past the client timeout
    on their first attempt, ``flaky`` ones get HTTP 500 once, ``broken`` ones always, ``denied`` ones HTTP 401.
    """

    def __init__(self):
        self.attempts: Counter[str] = Counter()
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before the reply

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                query = body["messages"][-1]["content"].split("\n\n", 1)[1]
                with owner.lock:
                    owner.attempts[query] += 1
                    attempt = owner.attempts[query]
                    owner.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                if query.startswith("slow") and attempt == 1:
                    time.sleep(1.0)
                if query.startswith("denied"):
                    return self._send(401, {"error": {"message": "invalid api key"}})
                if query.startswith("broken") or (query.startswith("flaky") and attempt == 1):
                    return self._send(500, {"error": {"message": "internal error"}})
                reply = {
                    "id": f"chatcmpl-{attempt}",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "DE> " + query[::-1]},
                         "finish_reason": "stop"}
                    ],
                }  # fmt: skip
                return self._send(200, reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def chat_server():
    server = _ChatServer()
    yield server
    server.close()


def _expected(query):
    return "DE> " + query[::-1]


def test_openai_translator_concurrent_requests_keep_order(chat_server):
    texts = [f"query number {i}" for i in range(12)]
    translator = OpenAITranslator(
        chat_server.url, model="served-model", api_key="test-key", max_workers=4, timeout=5, show_progress_bar=False
    )
    assert translator.translate(texts, "de") == [_expected(t) for t in texts]
    # This server speaks HTTP/1.0 and closes every connection after its reply: one connection per request.
    assert translator.stats() == {"requests": 12, "retries": 0, "timeouts": 0, "failures": 0, "connections": 12}
    assert len(chat_server.requests) == 12
    request = chat_server.requests[0]
    assert request["auth"] == "Bearer test-key"
    assert request["body"]["model"] == "served-model" and request["body"]["temperature"] == 0.0
    assert request["body"]["messages"][-1]["content"].startswith("Translate the following search query into German.")


def test_openai_translator_retries_timeout_and_500(chat_server):
    texts = ["slow query", "flaky query", "fine query"]
    translator = OpenAITranslator(
        chat_server.url, max_workers=3, timeout=0.3, max_retries=2, backoff=0.01, show_progress_bar=False
    )
    assert translator.translate(texts, "de") == [_expected(t) for t in texts]
    assert chat_server.attempts == Counter({"slow query": 2, "flaky query": 2, "fine query": 1})
    assert translator.num_timeouts == 1 and translator.num_retries == 2 and translator.num_failures == 0


def test_openai_translator_retries_exhausted(chat_server):
    rejecting = OpenAITranslator(chat_server.url, timeout=5, max_retries=2, backoff=0.01, show_progress_bar=False)
    assert rejecting.translate(["broken query", "good query"], "de") == [None, _expected("good query")]
    assert chat_server.attempts["broken query"] == 3
    assert rejecting.num_failures == 1 and rejecting.num_retries == 2

    raising = OpenAITranslator(
        chat_server.url, timeout=5, max_retries=1, backoff=0.01, on_failure="raise", show_progress_bar=False
    )
    with pytest.raises(TranslationError, match=r"gave up after 2 attempts.*HTTP 500"):
        raising.translate(["broken query"], "de")

    # 401 is a configuration error: no retries.
    with pytest.raises(TranslationError, match="HTTP 401"):
        rejecting.translate(["denied query"], "de")
    assert chat_server.attempts["denied query"] == 1


def test_openai_failures_are_counted_rejections_in_clr_build(chat_server, tmp_path):
    rows = [{"id": str(i), "query": q, "positive": "p"} for i, q in enumerate(["broken one", "good one", "good two"])]
    translator = OpenAITranslator(chat_server.url, timeout=5, max_retries=1, backoff=0.01, show_progress_bar=False)
    dataset, report = build_clr_dataset(
        rows, ["de"], translator, seed=0, cache_dir=tmp_path / "cache", show_progress_bar=False
    )
    assert report.rejected == {"failed": 1}
    assert [r["source_query"] for r in dataset] == ["good one", "good two"]
    assert [r["query"] for r in dataset] == [_expected("good one"), _expected("good two")]
    # Failures are not cached: a second build retries only the failed query; the others come from the cache.
    before = dict(chat_server.attempts)
    _, again = build_clr_dataset(
        rows, ["de"], translator, seed=0, cache_dir=tmp_path / "cache", show_progress_bar=False
    )
    assert again.cache_hits == 2 and again.translated == 1
    assert chat_server.attempts["broken one"] == before["broken one"] + 2
    assert chat_server.attempts["good one"] == before["good one"]


def test_openai_translator_connection_refused_is_clear():
    import socket

    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    translator = OpenAITranslator(
        f"http://127.0.0.1:{port}/v1", timeout=1, max_retries=1, backoff=0.01, on_failure="raise",
        show_progress_bar=False,
    )  # fmt: skip
    with pytest.raises(TranslationError, match="connection error"):
        translator.translate(["hello"], "de")


class _KeepAliveChatServer:
    """An HTTP/1.1 chat-completions server that keeps connections open and counts them (one handler per connection).

    The reply to a query is ``"DE> " + reversed(query)``; a query starting with ``slow`` takes ``slow_s`` seconds,
    any other ``fast_s``.
    """

    def __init__(self, fast_s: float, slow_s: float):
        self.connections = 0
        self.served: list[tuple[str, float, float]] = []  # (query, start, end) per request
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive
            disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall between

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with owner.lock:
                    owner.connections += 1

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                query = body["messages"][-1]["content"].split("\n\n", 1)[1]
                start = time.perf_counter()
                time.sleep(slow_s if query.startswith("slow") else fast_s)
                with owner.lock:
                    owner.served.append((query, start, time.perf_counter()))
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": _expected(query)}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_openai_window_does_not_wait_for_slow_requests_and_reuses_connections(tmp_path):
    """240 queries, 4 of them slow (in 4 different batches of 20), 8 requests in flight. While a batch's slow request
    runs, the requests of the next batches are served (the old builder waited for it before starting the next batch),
    so the build takes about the ideal time: the total server time over the 8 workers."""
    fast_s, slow_s, workers, batch = 0.05, 0.5, 8, 20
    slow_rows = {25, 85, 145, 205}
    rows = [{"id": str(i), "query": f"{'slow' if i in slow_rows else 'fast'} query {i}", "positive": "p"}
            for i in range(240)]  # fmt: skip
    ideal = (len(slow_rows) * slow_s + (len(rows) - len(slow_rows)) * fast_s) / workers
    waves = -(-batch // workers)  # ceil: rounds of `workers` requests per batch
    batch_by_batch = (len(rows) // batch - len(slow_rows)) * waves * fast_s + len(slow_rows) * slow_s
    server = _KeepAliveChatServer(fast_s, slow_s)
    try:
        with OpenAITranslator(server.url, max_workers=workers, timeout=10, show_progress_bar=False) as translator:
            start = time.perf_counter()
            report = write_clr_dataset(rows, tmp_path / "clr.jsonl", ["de"], translator, seed=0, batch_size=batch,
                                       prefetch_batches=4, show_progress_bar=False)  # fmt: skip
            elapsed = time.perf_counter() - start
            connections = translator.num_connections
    finally:
        server.close()
    written = [json.loads(line) for line in (tmp_path / "clr.jsonl").read_text().splitlines()]
    assert [r["query"] for r in written] == [_expected(r["query"]) for r in rows]  # source order kept
    assert report.num_output_rows == len(rows)
    # Each worker thread opened one connection and kept it: 8 connections for 240 requests (one each before).
    assert server.connections == connections <= workers
    # The mechanism, independent of the machine's load: later batches are served during each slow request.
    row_of = {query: int(query.rsplit(" ", 1)[1]) for query, _, _ in server.served}
    for query, _slow_start, slow_end in (entry for entry in server.served if entry[0].startswith("slow")):
        later = [q for q, start, _ in server.served if row_of[q] // batch > row_of[query] // batch and start < slow_end]
        assert len(later) >= workers, (query, len(later))
    # And the time: about the ideal (1.7 s), well under one slow request per batch after the other (3.2 s).
    assert elapsed < min(1.5 * ideal, batch_by_batch), (elapsed, ideal, batch_by_batch)


def test_openai_translator_reconnects_when_the_server_drops_a_kept_alive_connection():
    """The server closes the connection after every 3rd reply without saying so (as an idle keep-alive timeout
    does): the next request on it fails before any reply and is sent again on a new connection, not counted as a
    retry."""
    server = _KeepAliveChatServer(0.0, 0.0)
    handler = server.server.RequestHandlerClass
    served = Counter()

    def do_post_then_maybe_drop(self, _post=handler.do_POST):
        _post(self)
        served["replies"] += 1
        if served["replies"] % 3 == 0:
            self.close_connection = True  # closes the socket after this reply, without "Connection: close"

    handler.do_POST = do_post_then_maybe_drop
    texts = [f"query {i}" for i in range(9)]
    try:
        with OpenAITranslator(server.url, max_workers=1, timeout=5, max_retries=0, show_progress_bar=False) as client:
            assert client.translate(texts, "de") == [_expected(t) for t in texts]
            stats = client.stats()
    finally:
        server.close()
    assert stats["requests"] == 9 and stats["retries"] == 0 and stats["failures"] == 0
    assert stats["connections"] == server.connections == 3  # a new connection after each drop


# ------------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("language", "good", "bad"),
    [
        ("zh", "珠穆朗玛峰有多高？", "How tall is Everest?"),
        ("ja", "エベレストの高さは？", "Wie hoch ist der Everest?"),
        ("ko", "에베레스트 산의 높이는?", "珠穆朗玛峰有多高？"),
        ("ru", "Какова высота Эвереста?", "Wie hoch ist der Everest?"),
        ("ar", "ما هو ارتفاع جبل إيفرست؟", "Какова высота Эвереста?"),
        ("he", "מה גובהו של הר האוורסט?", "ما هو ارتفاع جبل إيفرست؟"),
        ("hi", "माउंट एवरेस्ट कितना ऊंचा है?", "মাউন্ট এভারেস্ট কত উঁচু?"),
        ("bn", "মাউন্ট এভারেস্ট কত উঁচু?", "माउंट एवरेस्ट कितना ऊंचा है?"),
        ("th", "ยอดเขาเอเวอเรสต์สูงเท่าไร", "ភ្នំអេវឺរេសខ្ពស់ប៉ុណ្ណា"),
        ("km", "ភ្នំអេវឺរេសខ្ពស់ប៉ុណ្ណា", "ยอดเขาเอเวอเรสต์สูงเท่าไร"),
        ("de", "Wie hoch ist der Mount Everest?", "Какова высота Эвереста?"),
        ("vi", "Núi Everest cao bao nhiêu?", "珠穆朗玛峰有多高？"),
    ],
)
def test_script_check_per_language(language, good, bad):
    validator = TranslationValidator()
    assert validator.check("How tall is Mount Everest, really?", good, language) is None
    assert validator.check("How tall is Mount Everest, really?", bad, language) == "script"
    assert validator.summary() == {"accepted": 1, "rejected": 1, "script": 1}


def test_validator_reasons_and_counts():
    validator = TranslationValidator(prompt_fragments=prompt_fragments(DEFAULT_PROMPT))
    source = "how tall is mount everest"
    cases = [
        (None, "failed"),
        ("   ", "empty"),
        ("How tall is  Mount Everest", "identical"),  # case and spacing do not make it a translation
        ("Translate the following search query into German. Wie hoch ist der Everest?", "prompt_echo"),
        ("Wie hoch ist der Mount Everest?", None),
    ]
    for output, reason in cases:
        assert validator.check(source, output, "de") == reason
    assert validator.accepted == 1
    assert dict(validator.rejected) == {"failed": 1, "empty": 1, "identical": 1, "prompt_echo": 1}
    # Latin brand names inside a Chinese query are fine as long as most letters are Han.
    assert script_ratio("iPhone 15 的价格是多少钱呢", {"Han"}) == pytest.approx(8 / 14)
    assert validator.reason("price of iphone 15", "iPhone 15 的价格是多少钱呢", "zh") is None
