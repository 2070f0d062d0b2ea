"""The query memory (Blacklight, Li et al. 2022): content fingerprints of queries, a bounded table of
recent ones, near-copies flagged, natural repeats a policy choice, memory fixed whatever the traffic."""
import numpy as np
import pytest

from kernels.errors import InvalidInputError
from kernels.query_memory import QueryMemory, QueryMemoryConfig, calibrated


def splitmix64_finalizer(h: int) -> int:
    """SplitMix64's finalizer (Steele, Lea & Flood 2014) in Python integers."""
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
    h = (h ^ (h >> 27)) * 0x94D049BB133111EB % 2**64
    return h ^ (h >> 31)


def brute_force_fingerprint(memory: QueryMemory, image: np.ndarray) -> list[int]:
    """Every window's polynomial with Python integers, keyed and mixed, the largest distinct ones."""
    c = memory.config
    q = [int(v) for v in np.floor(np.clip(image.ravel().astype(np.float64), 0, 1) * 255.0 / c.quantization)]
    base, key = int(memory._base), int(memory._key)
    hashes = set()
    for i in range(len(q) - c.window + 1):
        value = sum(q[i + j] * pow(base, c.window - 1 - j, 2**64) for j in range(c.window)) % 2**64
        hashes.add(splitmix64_finalizer(value ^ key))
    return sorted(hashes, reverse=True)[:c.hashes]


def patch_campaign(image: np.ndarray, steps: int, seed: int = 0) -> np.ndarray:
    """What a score-based attack like SquareAttack sends: each query the last one with one small square
    set to a new gray level (so no query repeats the one before)."""
    rng = np.random.default_rng(seed)
    x, out = image.copy(), []
    for level in rng.permutation(np.linspace(0.2, 0.8, steps)):
        r, c = rng.integers(0, image.shape[-2] - 4, size=2)
        x[..., r:r + 4, c:c + 4] = level
        out.append(x.copy())
    return np.stack(out)


def test_a_fingerprint_is_the_largest_distinct_window_hashes_a_per_window_loop_computes():
    memory = QueryMemory(QueryMemoryConfig(window=6, hashes=12, threshold=3), key=123)
    rng = np.random.default_rng(0)
    images = rng.random((3, 1, 8, 8)).astype(np.float32)
    images[1, :, :6] = 0.0                            # a constant region: many equal windows, one hash
    images[2] = 0.5                                   # one distinct window in all: padded with 0
    fps = memory.fingerprints(images)
    for image, fp in zip(images, fps):
        expected = brute_force_fingerprint(memory, image)
        assert [int(h) for h in fp[:len(expected)]] == expected
        assert (fp[len(expected):] == 0).all()
    assert (fps[2] != 0).sum() == 1


def test_the_table_finds_the_same_best_match_as_comparing_every_pair_of_fingerprints(mnist_subset):
    """The table's best match against the slow reference, the largest intersection of a query's fingerprint
    with any earlier one's, on real digits and near-copies interleaved: a whole stream as one batch and
    image by image."""
    x, _ = mnist_subset
    stream = np.concatenate([x[:40], patch_campaign(x[0], 10), x[40:60], patch_campaign(x[5], 10, seed=1)])
    config = QueryMemoryConfig(capacity=1000, threshold=20, ways=64)  # no hash held by more than 64: exact
    sets = [set(int(h) for h in fp if h) for fp in QueryMemory(config, key=5).fingerprints(stream)]
    expected = [max((len(sets[i] & sets[j]) for j in range(i)), default=0) for i in range(len(stream))]
    assert QueryMemory(config, key=5).observe(stream)[1].tolist() == expected  # one batch
    one_by_one = QueryMemory(config, key=5)
    assert [one_by_one.observe(image[None])[1][0] for image in stream] == expected  # image by image


def test_a_campaign_of_near_copies_is_flagged_from_its_second_query_and_distinct_digits_are_not(mnist_subset):
    x, _ = mnist_subset
    memory = QueryMemory(QueryMemoryConfig(threshold=25), key=1)
    flagged, _ = memory.observe(x[::2])  # 300 different digits, ten classes
    assert not flagged.any()
    flagged, matches = memory.observe(np.concatenate([x[1][None], patch_campaign(x[1], 30)]))
    assert not flagged[0] and flagged[1:].all(), matches


@pytest.mark.parametrize("policy", ["allow", "flag"])
def test_sending_the_same_image_again_is_a_policy_choice_not_a_false_alarm(mnist_subset, policy):
    x, _ = mnist_subset
    memory = QueryMemory(QueryMemoryConfig(repeats=policy), key=2)
    flagged, matches = memory.observe(np.stack([x[3], x[4], x[3]]))
    assert matches[2] == memory.config.hashes
    assert flagged.tolist() == [False, False, policy == "flag"]
    near = x[3].copy()
    near[0, 10, 10] = 1.0 - near[0, 10, 10]  # one pixel off: not a repeat, a near-copy
    assert memory.observe(near[None])[0][0]


def test_memory_is_fixed_at_start_and_forgets_queries_older_than_its_capacity(mnist_subset):
    x, _ = mnist_subset
    memory = QueryMemory(QueryMemoryConfig(capacity=20), key=4)
    size = memory.nbytes
    assert size == memory.buckets * memory.config.ways * 8 + 20 * 8 >= 2 * 20 * 50 * 8
    near = patch_campaign(x[0], 1)
    memory.observe(x[0][None])
    memory.observe(x[100:119])  # 19 other queries: x[0] is still the 20th most recent
    assert memory.observe(near)[0][0]
    memory.observe(x[200:221])  # 21 more: the campaign's queries are older than the capacity
    flagged, matches = memory.observe(patch_campaign(x[0], 2)[1:])
    assert not flagged[0] and matches[0] < memory.config.threshold
    memory.observe(np.random.default_rng(0).random((500, 1, 28, 28)).astype(np.float32))
    assert memory.nbytes == size


def test_query_numbers_wrap_around_without_losing_a_match(mnist_subset):
    x, _ = mnist_subset
    memory = QueryMemory(QueryMemoryConfig(capacity=50), key=6)
    memory.seen = 2**32 - 3
    flagged, _ = memory.observe(patch_campaign(x[7], 8))
    assert memory.seen == 2**32 + 5 and flagged[1:].all()


def test_the_hash_key_is_secret_and_fresh_per_memory(mnist_subset):
    x, _ = mnist_subset
    a, b = QueryMemory(), QueryMemory()
    assert not np.intersect1d(a.fingerprints(x[:1]), b.fingerprints(x[:1])).size
    assert (QueryMemory(key=9).fingerprints(x[:1]) == QueryMemory(key=9).fingerprints(x[:1])).all()


def test_calibration_picks_the_smallest_threshold_that_flags_at_most_the_rate(mnist_subset):
    x = mnist_subset[0][::3]
    config, measured = calibrated(QueryMemoryConfig(), x, rate=0.01, seed=3, orders=2)
    rng, matches = np.random.default_rng(3), []
    for i in range(2):  # the same orders and keys, one image per call
        order, memory = rng.permutation(len(x)), QueryMemory(config, key=3 + i)
        matches += [memory.observe(x[j][None])[1][0] for j in order]
    matches = np.array(matches)
    assert (matches >= config.threshold).mean() <= 0.01 < (matches >= config.threshold - 1).mean()
    assert measured["realized"] == (matches >= config.threshold).mean() and measured["queries"] == 2 * len(x)


@pytest.mark.parametrize("knobs, problem", [
    (dict(threshold=60), "threshold 60 exceeds the 50 hashes"),
    (dict(repeats="sometimes"), "repeats must be one of allow, flag"),
    (dict(capacity=0), "capacity must be at least 1"),
    (dict(capacity=2**30), "capacity must be below 2"),
])
def test_bad_knobs_are_refused_by_name(knobs, problem):
    with pytest.raises(InvalidInputError, match=problem):
        QueryMemoryConfig(**knobs)


def test_served_parameters_are_parsed_knob_by_knob():
    assert QueryMemoryConfig.from_strings({"window": "30", "repeats": "flag"}) == QueryMemoryConfig(window=30,
                                                                                                  repeats="flag")
    with pytest.raises(InvalidInputError, match=r"unknown knob\(s\) \['size'\]"):
        QueryMemoryConfig.from_strings({"size": "3"})
    with pytest.raises(InvalidInputError, match="invalid literal"):
        QueryMemoryConfig.from_strings({"window": "wide"})


def test_an_image_shorter_than_a_window_is_refused():
    with pytest.raises(InvalidInputError, match="shorter than a window of 50"):
        QueryMemory().fingerprints(np.zeros((1, 1, 5, 5), np.float32))
