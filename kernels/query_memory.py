"""Stateful detection of query-based black-box attacks: a bounded memory of recent queries' content
fingerprints (Blacklight; Li, Shan, Wenger, Zhang, Zheng & Zhao, USENIX Security 2022).

Query-based attacks (SquareAttack, HopSkipJump, BoundaryAttack) send hundreds of near-identical images.
Blacklight's observation: quantize a query's pixels, hash every window of ``window`` consecutive
pixels of the flattened image, keep the ``hashes`` largest hash values as the query's fingerprint, and
flag a query that shares at least ``threshold`` of them with one recent query. Two attack queries a small
step apart share most windows; two different natural images share few (the all-background window
counts once, being one value).

Here:

- the window hash is a polynomial of the quantized pixels mixed by a keyed SplitMix64 finalizer, its
  key drawn from the OS at start (an attacker does not know which windows a query keeps);
- the memory is a bucketed table of ``(tag, query number)`` entries, ``ways`` per bucket: inserting a
  hash replaces its bucket's oldest entry, and an entry older than ``capacity`` queries never matches,
  so memory is fixed at start (8 bytes per entry, ``2 * capacity * hashes`` entries) whatever the traffic;
  a hash that more than ``ways`` recent queries hold (a window common to many digits) keeps its newest
  holders only, so what a query shares with an older look-alike can be under-counted (never what it
  shares with the newest); calibration runs the same table, so the threshold is set on what is served;
- an exact repeat of a remembered query (the same pixels) is a policy choice, ``repeats``: ``"allow"``
  (default; a client re-sending an image learns nothing new) or ``"flag"``.

:class:`QueryMemory` is what both served models run on each batch of requests, its images in arrival
order, each matched against all the queries before it. Compiled with numba: hashing, lookups and
insertions of an image in one pass (about 0.03 ms per request at batch 1, where the first version,
vectorized NumPy, took 0.2; ``python -m kernels.benchmark --query-memory``).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass

import numba
import numpy as np

from kernels.errors import InvalidInputError

REPEAT_POLICIES = ("allow", "flag")
LOAD = 2  # table entries per remembered hash
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # SplitMix64's finalizer
_U32 = np.uint64(0xFFFFFFFF)


@numba.njit(cache=True)
def _mix(h: np.uint64) -> np.uint64:
    """SplitMix64's finalizer (wrapping 64-bit arithmetic): a bijection that spreads every bit."""
    h = (h ^ (h >> np.uint64(30))) * _M1
    h = (h ^ (h >> np.uint64(27))) * _M2
    return h ^ (h >> np.uint64(31))


@numba.njit(cache=True)
def _fingerprint(pixels, window, quantization, hashes, key, base, top, out):
    """Write into ``out`` (``hashes`` values) the largest distinct keyed window hashes of ``pixels`` (one
    flattened image), in descending order, zero-padded (0 is never a match). A window's polynomial
    ``sum_j q[i + j] * base^(window - 1 - j)`` (mod 2^64) rolls from the last one: subtract the leaving
    pixel times ``top = base^(window - 1)``, multiply by ``base``, add the entering pixel. The largest are
    kept by insertion into ``out``, which a random value enters rarely once it is full."""
    n = pixels.shape[0]
    q = np.empty(n, np.uint64)
    for i in range(n):
        v = min(max(np.float64(pixels[i]), 0.0), 1.0)
        q[i] = np.uint64(np.floor(v * 255.0 / quantization))
    h = np.uint64(0)
    for j in range(window):
        h = h * base + q[j]
    kept = 0
    for i in range(n - window + 1):
        if i > 0:
            h = (h - q[i - 1] * top) * base + q[i + window - 1]
        v = _mix(h ^ key)
        if v == 0 or (kept == hashes and v <= out[kept - 1]):
            continue
        p = kept
        while p > 0 and out[p - 1] < v:
            p -= 1
        if p > 0 and out[p - 1] == v:  # kept already
            continue
        for t in range(min(kept, hashes - 1), p, -1):
            out[t] = out[t - 1]
        out[p] = v
        kept = min(kept + 1, hashes)
    out[kept:] = 0


@numba.njit(cache=True)
def _observe(images, digests, table, ring, seen, capacity, window, quantization, hashes, threshold,
             allow_repeats, key, base, top, flagged, matches):
    """:meth:`QueryMemory.observe` on ``images`` (``(B, n)``), one after the other: each matched against
    the table, then its hashes written. An entry of ``table`` is ``tag << 32 | query number mod 2^32`` (the
    query numbers 1-based), a bucket's ways side by side: one cache line."""
    buckets, ways = table.shape
    fp = np.empty(hashes, np.uint64)
    ages = np.empty(hashes * ways, np.int64)
    for j in range(images.shape[0]):
        _fingerprint(images[j], window, quantization, hashes, key, base, top, fp)
        number = seen + j + 1
        current = np.uint64(number) & _U32
        previous = np.uint64(number - 1) & _U32
        found = 0  # the remembered queries sharing a hash: their age, 0 the query just before
        for k in range(hashes):
            h = fp[k]
            if h == 0:
                continue
            b, tag = np.int64(h % np.uint64(buckets)), h >> np.uint64(32)
            for w in range(ways):
                if table[b, w] >> np.uint64(32) == tag:
                    age = np.int64((previous - table[b, w]) & _U32)
                    if age < capacity:
                        ages[found] = age
                        found += 1
        best, best_repeat = 0, False  # per query most shared hashes, an exact repeat first on ties
        run = np.sort(ages[:found])
        k = 0
        while k < found:
            e = k
            while e < found and run[e] == run[k]:
                e += 1
            repeat = ring[(number - 2 - run[k]) % capacity] == digests[j]
            if e - k > best or (e - k == best and repeat and not best_repeat):
                best, best_repeat = e - k, repeat
            k = e
        matches[j] = best
        flagged[j] = best >= threshold and not (best_repeat and allow_repeats)
        for k in range(hashes):  # remember: each hash into its bucket's oldest way
            h = fp[k]
            if h == 0:
                continue
            b = np.int64(h % np.uint64(buckets))
            oldest, oldest_age = 0, np.uint64(0)
            for w in range(ways):
                age = (current - table[b, w]) & _U32
                if age > oldest_age:
                    oldest, oldest_age = w, age
            table[b, oldest] = (h >> np.uint64(32) << np.uint64(32)) | current
        ring[(number - 1) % capacity] = digests[j]


@dataclass(frozen=True)
class QueryMemoryConfig:
    """Knobs of :class:`QueryMemory` (written into the served models' configs by the repository writer).

    Attributes:
        capacity: queries remembered; older ones never match.
        window: consecutive pixels (of the flattened image, channels first) per hashed window.
        quantization: pixel step on the 0-255 scale; pixels in one step hash alike (Blacklight's 50).
        hashes: largest window hashes kept per query (its fingerprint).
        threshold: shared hashes with one remembered query that flag a query (default half of them, as
            Blacklight; ``nfp calibrate`` sets it from clean traffic).
        repeats: an exact repeat of a remembered query: ``"allow"`` or ``"flag"``.
        ways: entries per bucket of the table.
    """

    capacity: int = 100_000
    window: int = 50
    quantization: int = 50
    hashes: int = 50
    threshold: int = 25
    repeats: str = "allow"
    ways: int = 8

    def __post_init__(self) -> None:
        for name in ("capacity", "window", "quantization", "hashes", "threshold", "ways"):
            if int(getattr(self, name)) < 1:
                raise InvalidInputError(f"query memory: {name} must be at least 1, got {getattr(self, name)}")
        if self.capacity >= 1 << 30:
            raise InvalidInputError(f"query memory: capacity must be below 2^30 queries, got {self.capacity}")
        if self.threshold > self.hashes:
            raise InvalidInputError(f"query memory: threshold {self.threshold} exceeds the {self.hashes} hashes kept")
        if self.repeats not in REPEAT_POLICIES:
            raise InvalidInputError(f"query memory: repeats must be one of {', '.join(REPEAT_POLICIES)}, "
                                    f"got {self.repeats!r}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_strings(cls, knobs: dict[str, str]) -> "QueryMemoryConfig":
        """From text values (a served model's config parameters), each knob checked."""
        unknown = sorted(set(knobs) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidInputError(f"query memory: unknown knob(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        try:
            return cls(**{k: v if k == "repeats" else int(v) for k, v in knobs.items()})
        except ValueError as e:
            raise InvalidInputError(f"query memory: {e}") from None


class QueryMemory:
    """The last ``capacity`` queries' fingerprints and the match test (module docstring).

    Args:
        config: the knobs.
        key: the 64-bit hash key; default fresh from the OS (give one only to reproduce a measurement).
    """

    def __init__(self, config: QueryMemoryConfig = QueryMemoryConfig(), key: int | None = None) -> None:
        self.config = c = config
        key = int.from_bytes(os.urandom(8), "little") if key is None else key
        self._key = np.uint64(key & (2**64 - 1))
        self._base = np.uint64(_mix(self._key ^ np.uint64(0x9E3779B97F4A7C15)) | 1)  # odd
        # twice the entries the remembered queries hold: at this load a full bucket (whose oldest entry is
        # then replaced) is rare, so a query keeps nearly all its hashes until it is `capacity` queries old
        self.buckets = -(-LOAD * c.capacity * c.hashes // c.ways)
        # an entry: the hash's upper 32 bits (its tag) and the number (mod 2^32) of the query that wrote it;
        # ages are differences mod 2^32, so numbers may wrap; a never-written entry starts 2^31 queries old
        # (dead, and the first to be replaced)
        self._table = np.full((self.buckets, c.ways), 1 << 31, np.uint64)
        self._digests = np.zeros(c.capacity, np.uint64)  # of each remembered query's exact pixels
        self._top = np.uint64(pow(int(self._base), c.window - 1, 2**64))  # base^(window - 1)
        self.seen = 0  # queries so far

    @property
    def nbytes(self) -> int:
        """Memory of the table and the digests, fixed at start."""
        return self._table.nbytes + self._digests.nbytes

    def _flat(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        x = np.ascontiguousarray(images.reshape(len(images), math.prod(images.shape[1:])))
        if x.shape[1] < self.config.window:
            raise InvalidInputError(f"query memory: images of {x.shape[1]} values are shorter than a window of "
                                    f"{self.config.window}")
        return x

    def fingerprints(self, images: np.ndarray) -> np.ndarray:
        """``(B, hashes) uint64``: the largest distinct keyed window hashes of each image of ``images``
        (``(B, ...)`` in [0, 1]), padded with 0 (never a match) where an image has fewer distinct windows."""
        c, x = self.config, self._flat(images)
        out = np.zeros((len(x), c.hashes), np.uint64)
        for image, fp in zip(x, out):
            _fingerprint(image, c.window, c.quantization, c.hashes, self._key, self._base, self._top, fp)
        return out

    def digest(self, images: np.ndarray) -> np.ndarray:
        """``(B,) uint64``: a keyed BLAKE2b of each image's exact float32 values (what ``repeats`` compares)."""
        return self._digest_rows(self._flat(images))

    def _digest_rows(self, x: np.ndarray) -> np.ndarray:
        key = self._key.tobytes()
        return np.array([int.from_bytes(hashlib.blake2b(row.data, digest_size=8, key=key).digest(), "little")
                         for row in x], np.uint64)

    def observe(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Match each image against the memory (the queries before it, its batch's included), then
        remember it; images in arrival order.

        Returns ``(flagged (B,) bool, matches (B,) int)``: ``matches`` is the most hashes the image
        shares with one earlier query; flagged when it reaches ``threshold``, unless that query (the one
        with the most shared hashes) had exactly the same pixels and ``repeats="allow"``. Compiled
        (:func:`_observe`): one image's fingerprint, lookups and insertions in one pass, no temporaries."""
        c, x = self.config, self._flat(images)
        flagged, matches = np.zeros(len(x), bool), np.zeros(len(x), np.int64)
        _observe(x, self._digest_rows(x), self._table, self._digests, self.seen, c.capacity, c.window,
                 c.quantization, c.hashes, c.threshold, c.repeats == "allow", self._key, self._base, self._top,
                 flagged, matches)
        self.seen += len(x)
        return flagged, matches


def calibrated(config: QueryMemoryConfig, images: np.ndarray, rate: float = 0.001, seed: int = 0, orders: int = 5
               ) -> tuple[QueryMemoryConfig, dict]:
    """``config`` with the smallest ``threshold`` that flags at most ``rate`` of a benign stream: ``images``
    (distinct clean images) sent to an empty memory in ``orders`` seeded random orders, the shares pooled;
    and what was measured (queries, rate, realized share, the most matches seen). The share grows with the
    traffic a memory has seen (more chances of a look-alike), so measure it again on a longer stream."""
    if not 0 < rate < 1:
        raise InvalidInputError(f"query memory: the benign flag rate must lie in (0, 1), got {rate}")
    rng = np.random.default_rng(seed)
    matches = np.concatenate([QueryMemory(config, key=seed + i).observe(np.asarray(images)[rng.permutation(len(images))])[1]
                              for i in range(orders)])
    thresholds = np.arange(1, config.hashes + 1)
    shares = (matches[:, None] >= thresholds).mean(axis=0)
    threshold = int(thresholds[np.argmax(shares <= rate)]) if (shares <= rate).any() else config.hashes
    return (QueryMemoryConfig(**{**config.to_json(), "threshold": threshold}),
            {"queries": int(len(matches)), "images": len(images), "orders": orders, "rate": rate,
             "realized": float(shares[threshold - 1]), "max_matches": int(matches.max(initial=0)), "seed": seed})
