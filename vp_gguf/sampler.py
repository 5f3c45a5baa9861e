"""The sampler of one generation: llama.cpp's sampler chain for a SamplingParams, and its grammar.

The chain is llama.cpp's common sampler's, in its order: the penalties, then greedy, or top-k, top-p,
min-p, the temperature and the seeded draw. A grammar (GBNF, or a JSON schema converted to GBNF by
llama-cpp-python's converter) sits beside the chain, not in it, as in llama.cpp's common sampler:
masking the whole vocabulary through the grammar is one pass over every token's text, dearer than the
draw itself on a large vocabulary, so the chain draws first and the grammar checks that one token; only
a token it refuses costs the masked draw. The prompt's text tokens go into the penalties' history (as
llama.cpp's server counts them) but never into the grammar, which constrains the reply alone.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _log
from ._libs import llama_cpp as L
from .errors import DecodeError, InvalidArgumentError
from .sampling import SamplingParams

# llama.cpp's grammar parser recurses once per nested group and its stack walk once per rule that
# starts with another rule: a grammar nested deeply enough overflows the C stack (a crash, not an
# error). These bounds keep any accepted grammar far from that and far above what real grammars use
# (the JSON-schema converter's grammars nest a handful of groups and take a rule per property).
MAX_GRAMMAR_NESTING = 256
MAX_GRAMMAR_RULES = 4096
# what the parser skips (comments, literals, character classes) and what it counts (groups, rules)
_GBNF_LEXEMES = re.compile(r'#[^\n]*|"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[()]|::=')
MAX_REASON = 120  # characters of the parser's reason in the error
_PARSE_REASON = re.compile(rb"error parsing grammar: ([^\n]*)")
_STDERR = threading.Lock()  # one borrower of file descriptor 2 at a time
_TOKEN_DATA = np.dtype(L.llama_token_data)
# a character of a JSON string (RFC 8259): any but the quote, the backslash and control characters, or an escape
JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
_CHAR_RULE = re.compile(r"^char ::= .*$", re.MULTILINE)


def grammar_text(s: SamplingParams) -> str | None:
    """The GBNF that constrains ``s``'s text: its grammar, or its JSON schema converted; None if neither.
    An empty grammar is none, as in llama.cpp."""
    if s.grammar:
        return s.grammar
    schema = s.schema()
    if schema is None:
        return None
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # after ._libs: it loads our libllama

    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # noqa: BLE001 - the converter fails on what it cannot convert with errors of every kind
        raise InvalidArgumentError(f"json_schema cannot be converted to a grammar: {e}") from None
    # its string character takes control characters too, which JSON's strings may not hold raw (json.loads
    # refuses them): the character of JSON's own grammar instead, as llama.cpp's C++ converter has it
    return _CHAR_RULE.sub(lambda _: JSON_CHAR, gbnf)


def check_grammar_shape(text: str) -> None:
    """Refuse a grammar nested deeper, or with more rules, than llama.cpp's parser can take safely."""
    depth = deepest = n_rules = 0
    for m in _GBNF_LEXEMES.finditer(text):
        lexeme = m.group()
        if lexeme == "(":
            depth += 1
            n_rules += 1  # a group is a rule of its own in the parsed grammar
            deepest = max(deepest, depth)
        elif lexeme == ")":
            depth -= 1
        elif lexeme == "::=":
            n_rules += 1
    if deepest > MAX_GRAMMAR_NESTING:
        raise InvalidArgumentError(f"grammar: groups nested {deepest} deep, more than {MAX_GRAMMAR_NESTING}")
    if n_rules > MAX_GRAMMAR_RULES:
        raise InvalidArgumentError(f"grammar: {n_rules} rules and groups, more than {MAX_GRAMMAR_RULES}")


def parse_grammar(vocab, text: str):
    """llama.cpp's grammar sampler for ``text`` (start symbol ``root``); InvalidArgumentError with the
    parser's reason if it does not parse (llama_sampler_init_grammar returns NULL then)."""
    check_grammar_shape(text)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError("grammar: the text holds a lone surrogate (not valid Unicode)") from None
    if b"\0" in data:
        raise InvalidArgumentError("grammar: the text holds a NUL character")
    _log.clear()
    grammar, printed = _with_stderr_kept(lambda: L.llama_sampler_init_grammar(vocab, data, b"root"))
    if grammar:
        os.write(2, printed)  # not the parser's: another thread's, in that moment
        return grammar
    said = _PARSE_REASON.search(printed)
    reason = said.group(1).decode("utf-8", "replace").strip() if said else _log.last_error()
    if len(reason) > MAX_REASON:  # the parser quotes the rest of the grammar after the fault
        reason = reason[:MAX_REASON] + "..."
    raise InvalidArgumentError(f"grammar: llama.cpp cannot parse it: {reason or 'no reason given'}")


def _with_stderr_kept(call):
    """(call(), what was written to file descriptor 2 meanwhile): llama.cpp's grammar parser prints
    why it failed, with the whole grammar, to stderr rather than to its log; the reason belongs in
    the error, the grammar's echo nowhere."""
    with _STDERR, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            result = call()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        return result, tmp.read()


def _chain(n_vocab: int, s: SamplingParams, history: int):
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    if history:
        pen = L.llama_sampler_init_penalties(
            n_vocab, history, s.repeat_penalty, s.frequency_penalty, s.presence_penalty
        )
        L.llama_sampler_chain_add(chain, pen)
    # greedy at temperature 0, and below MIN_TEMPERATURE where llama.cpp's division by it would overflow
    if s.greedy:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
    else:
        if s.top_k > 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(s.top_k))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(s.top_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(s.min_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(s.temperature))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(s.seed & 0xFFFFFFFF))
    return chain


class Sampler:
    """Draws the next token from a context's last logits; close() frees the samplers.

    ``n_ctx`` bounds the penalties' window: llama.cpp allocates the whole window up front (repeat_last_n
    2**31 - 1 would be 8 GB), and no text the context holds is longer, so the bound changes nothing else."""

    def __init__(self, vocab, n_vocab: int, s: SamplingParams, n_ctx: int) -> None:
        text = grammar_text(s)
        self._grammar = parse_grammar(vocab, text) if text is not None else None
        self._history = min(s.repeat_last_n, n_ctx) if s.penalized else 0
        self._chain = _chain(n_vocab, s, self._history)
        self._n_vocab = n_vocab
        self._ids = np.arange(n_vocab, dtype=np.int32) if self._grammar else None
        self._cand = np.zeros(n_vocab, dtype=_TOKEN_DATA) if self._grammar else None
        # the grammar's check of a single token: one array over one element, reused at every token
        self._one = L.llama_token_data()
        self._one_arr = L.llama_token_data_array(data=ctypes.pointer(self._one), size=1, selected=-1, sorted=False)

    def close(self) -> None:
        if self._grammar:
            L.llama_sampler_free(self._grammar)
            self._grammar = None
        if self._chain:
            L.llama_sampler_free(self._chain)
            self._chain = None

    def remember(self, tokens: Sequence[int]) -> None:
        """Tokens the text already holds (the prompt's): the penalties count the last of them."""
        if self._history:
            for tok in tokens[-self._history :]:
                L.llama_sampler_accept(self._chain, tok)

    def sample(self, ctx) -> int:
        """The next token, taken into the penalties' history and the grammar's state."""
        if self._grammar is None:
            return int(L.llama_sampler_sample(self._chain, ctx, -1))
        cand = self._candidates(ctx)
        L.llama_sampler_apply(self._chain, ctypes.byref(cand))
        tok = self._selected(cand)
        if tok is None or not self._allowed(tok):
            cand = self._candidates(ctx)  # the chain's draw again, from the tokens the grammar allows
            L.llama_sampler_apply(self._grammar, ctypes.byref(cand))
            L.llama_sampler_apply(self._chain, ctypes.byref(cand))
            tok = self._selected(cand)
            if tok is None or not self._allowed(tok):
                # the grammar's next character is in no token of this vocabulary: taking a token anyway
                # would abort the process in llama.cpp
                raise InvalidArgumentError("the grammar allows no token of this model's vocabulary here")
        L.llama_sampler_accept(self._grammar, tok)
        L.llama_sampler_accept(self._chain, tok)
        return tok

    def _candidates(self, ctx) -> Any:  # a llama_token_data_array over our buffer
        logits = L.llama_get_logits_ith(ctx, -1)
        if not logits:
            raise DecodeError("no logits to sample from")
        assert self._cand is not None and self._ids is not None
        self._cand["id"] = self._ids  # the samplers sort and cut the array in place: refilled each time
        self._cand["logit"] = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
        self._cand["p"] = 0.0
        data = self._cand.ctypes.data_as(ctypes.POINTER(L.llama_token_data))
        return L.llama_token_data_array(data=data, size=self._n_vocab, selected=-1, sorted=False)

    @staticmethod
    def _selected(cand: Any) -> int | None:
        if not 0 <= cand.selected < cand.size:
            return None
        return int(cand.data[cand.selected].id)

    def _allowed(self, tok: int) -> bool:
        self._one.id, self._one.logit, self._one.p = tok, 1.0, 0.0
        self._one_arr.size, self._one_arr.selected = 1, -1
        L.llama_sampler_apply(self._grammar, ctypes.byref(self._one_arr))
        return math.isfinite(self._one.logit)
