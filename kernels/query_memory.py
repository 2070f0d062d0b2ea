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
- an exact repeat of a remembered query (the same pixels) is a policy choice, ``repeats``: ``"allow"``
  (default; a client re-sending an image learns nothing new) or ``"flag"``.

:class:`QueryMemory` is what both served models run on each batch of requests, its images in arrival
order: a batch is matched at once, against the table and among its own images.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass

import numpy as np

from kernels.errors import InvalidInputError

REPEAT_POLICIES = ("allow", "flag")
LOAD = 2  # table entries per remembered hash
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # SplitMix64's finalizer


def _mix(h: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, elementwise on a ``uint64`` array (wrapping, as NumPy's integer arrays do
    silently): a bijection that spreads every bit."""
    h = (h ^ (h >> np.uint64(30))) * _M1
    h = (h ^ (h >> np.uint64(27))) * _M2
    return h ^ (h >> np.uint64(31))


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """For each position of a sorted array, where its run of equal values starts."""
    n = len(sorted_values)
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.zeros(n, np.int64)
    changed = np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1
    starts[changed] = changed
    return np.maximum.accumulate(starts)


def _inverse(a: np.uint64) -> np.uint64:
    """The inverse of an odd ``a`` mod 2^64 (Newton's iteration, each step doubling the correct bits)."""
    a, x = int(a), int(a)
    for _ in range(6):
        x = x * (2 - a * x) % 2**64
    return np.uint64(x)


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
        self._base = _mix(np.array([self._key ^ np.uint64(0x9E3779B97F4A7C15)]))[0] | np.uint64(1)  # odd
        # twice the entries the remembered queries hold: at this load a full bucket (whose oldest entry is
        # then replaced) is rare, so a query keeps nearly all its hashes until it is `capacity` queries old
        self.buckets = -(-LOAD * c.capacity * c.hashes // c.ways)
        self._tags = np.zeros((self.buckets, c.ways), np.uint32)
        # the query number (mod 2^32) that wrote each entry; ages are differences mod 2^32, so numbers may
        # wrap; a never-written entry starts 2^31 queries old (dead, and the first to be replaced)
        self._seqs = np.full((self.buckets, c.ways), 1 << 31, np.uint32)
        self._digests = np.zeros(c.capacity, np.uint64)  # of each remembered query's exact pixels
        self._powers = self._inverse_powers = None  # of the hash base, per image size (fingerprints)
        self.seen = 0  # queries so far

    @property
    def nbytes(self) -> int:
        """Memory of the table and the digests, fixed at start."""
        return self._tags.nbytes + self._seqs.nbytes + self._digests.nbytes

    def fingerprints(self, images: np.ndarray) -> np.ndarray:
        """``(B, hashes) uint64``: the largest distinct keyed window hashes of each image of ``images``
        (``(B, ...)`` in [0, 1]), padded with 0 (never a match) where an image has fewer distinct windows.

        Every window's polynomial ``sum_j q[i + j] * base^(window - 1 - j)`` (mod 2^64) comes from one
        prefix sum: ``base`` is odd, hence invertible mod 2^64, so a window is a difference of prefix
        sums times a power of ``base``'s inverse."""
        c = self.config
        x = np.asarray(images, np.float64).reshape(len(images), -1)
        n = x.shape[1]
        if n < c.window:
            raise InvalidInputError(f"query memory: images of {n} values are shorter than a window of {c.window}")
        if self._powers is None or len(self._powers) != n:
            self._powers = np.cumprod(np.r_[np.uint64(1), np.full(n - 1, self._base)], dtype=np.uint64)
            self._inverse_powers = np.cumprod(np.r_[np.uint64(1), np.full(n - 1, _inverse(self._base))],
                                              dtype=np.uint64)
        q = np.floor(np.clip(x, 0.0, 1.0) * 255.0 / c.quantization).astype(np.uint64)
        prefix = np.zeros((len(q), n + 1), np.uint64)
        np.cumsum(q * self._powers[::-1], axis=1, dtype=np.uint64, out=prefix[:, 1:])
        # sum_{t<k} q[t] base^(n-1-t): window i is (prefix[i+w] - prefix[i]) / base^(n-i-w)
        windows = (prefix[:, c.window:] - prefix[:, :-c.window]) * self._inverse_powers[:n - c.window + 1][::-1]
        h = np.sort(_mix(windows ^ self._key), axis=1)
        h[:, 1:][h[:, 1:] == h[:, :-1]] = 0  # keep one of each value; the others stay sorted
        distinct = h != 0
        rank = np.cumsum(distinct[:, ::-1], axis=1)[:, ::-1]  # 1: the largest distinct value
        keep = distinct & (rank <= c.hashes)
        top = np.zeros((len(h), c.hashes), np.uint64)
        top[np.nonzero(keep)[0], rank[keep] - 1] = h[keep]
        return top

    def digest(self, images: np.ndarray) -> np.ndarray:
        """``(B,) uint64``: a keyed BLAKE2b of each image's exact float32 values (what ``repeats`` compares)."""
        x = np.ascontiguousarray(np.asarray(images, np.float32).reshape(len(images), -1))
        key = int(self._key).to_bytes(8, "little")
        return np.array([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8, key=key).digest(), "little")
                         for row in x], np.uint64)

    def observe(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Match each image against the memory and the images before it in ``images``, then remember them.

        Returns ``(flagged (B,) bool, matches (B,) int)``: ``matches`` is the most hashes the image
        shares with one earlier query; flagged when it reaches ``threshold``, unless that query (the one
        with the most shared hashes) had exactly the same pixels and ``repeats="allow"``. One batch is
        matched at once: against the table as it stood before the batch, and among its own images by
        sorting their hashes; then all are inserted, each bucket's newest first into its oldest ways."""
        c = self.config
        fps, digests = self.fingerprints(images), self.digest(images)
        b, seen = len(fps), self.seen
        rows = np.repeat(np.arange(b), c.hashes)
        flat = fps.ravel()
        rows, flat = rows[flat != 0], flat[flat != 0]
        bucket, tag = (flat % np.uint64(self.buckets)).astype(np.int64), (flat >> np.uint64(32)).astype(np.uint32)
        # the remembered queries: an entry `age` queries older than the last one before the batch is
        # `age + j` queries older than image j's predecessor, and matches while that is below the capacity
        age = (np.uint32(seen & 0xFFFFFFFF) - self._seqs[bucket]).astype(np.int64)  # wraps mod 2^32
        hit, way = np.nonzero((self._tags[bucket] == tag[:, None]) & (age + rows[:, None] < c.capacity))
        pairs = [(rows[hit], -1 - age[hit, way])]  # (image, earlier query relative to the batch: -1 the last)
        if b > 1:  # the batch's own earlier images: pairs of equal hashes, the earlier image first (stable sort)
            order = np.argsort(flat, kind="stable")
            v, r = flat[order], rows[order]
            run = _run_starts(v)
            before = np.arange(len(v)) - run  # equal hashes of earlier images
            later = np.repeat(np.arange(len(v)), before)
            earlier = run[later] + np.arange(len(later)) - np.repeat(np.cumsum(before) - before, before)
            near = r[later] - r[earlier] <= c.capacity
            pairs.append((r[later][near], r[earlier][near]))
        image, other = (np.concatenate(p) for p in zip(*pairs))
        span = c.capacity + 1 + b  # `other` lies in [-capacity, b): one int64 key per (image, other) pair
        keys, counts = np.unique(image * span + (other + c.capacity), return_counts=True)
        image, other = keys // span, keys % span - c.capacity
        remembered = self._digests[(seen + other[other < 0]) % c.capacity]
        repeat = np.zeros(len(other), bool)
        repeat[other < 0] = remembered == digests[image[other < 0]]
        repeat[other >= 0] = digests[other[other >= 0]] == digests[image[other >= 0]]
        best = np.lexsort((~repeat, -counts, image))  # per image: most shared hashes, a repeat first on ties
        first = best[_run_starts(image[best]) == np.arange(len(best))]
        matches = np.zeros(b, np.int64)
        flagged = np.zeros(b, bool)
        matches[image[first]] = counts[first]
        flagged[image[first]] = (counts[first] >= c.threshold) & ~(repeat[first] & (c.repeats == "allow"))
        # remember: per bucket the newest entries (up to `ways`) into its oldest ways
        order = np.lexsort((-rows, bucket))
        rank = np.arange(len(order)) - _run_starts(bucket[order])
        keep = order[rank < c.ways]
        oldest_first = np.argsort(-age[keep], axis=1, kind="stable")
        way = np.take_along_axis(oldest_first, rank[rank < c.ways][:, None], axis=1)[:, 0]
        self._tags[bucket[keep], way] = tag[keep]
        self._seqs[bucket[keep], way] = ((seen + 1 + rows[keep]) & 0xFFFFFFFF).astype(np.uint32)
        self._digests[(seen + np.arange(b)) % c.capacity] = digests
        self.seen += b
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
