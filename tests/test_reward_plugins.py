"""Reward plugin package: contract, registry routes, built-ins, composite, normaliser."""

import math
import pickle
import statistics
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from reward import (
    BUILTINS,
    CompositeReward,
    RewardError,
    RewardResult,
    RunningNormalizer,
    build_reward,
    call_reward,
    check_scores,
    known_rewards,
)

FIXTURES = Path(__file__).parent / "fixtures" / "reward"
MOD = "rlhf_test_rewards"


@pytest.fixture
def fixture_rewards(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    yield
    sys.modules.pop(MOD, None)


def _tiny_tokenizer():
    """A real fast tokenizer (WordLevel over a fixed vocabulary, whitespace+punctuation split)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ("hello world this is great awful a movie the food was good bad i love hate it "
             "and , . ! ?").split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


# --- contract: check_scores / call_reward -------------------------------------------------

@pytest.mark.parametrize("scores", [
    [1, 2.5, -3], (1, 2.5, -3), np.array([1, 2.5, -3]), torch.tensor([1, 2.5, -3]),
    iter([1, 2.5, -3]), [np.float32(1), torch.tensor(2.5), np.int64(-3)],
])
def test_check_scores_accepts_sequences(scores):
    assert check_scores("r", scores, 3) == [1.0, 2.5, -3.0]


@pytest.mark.parametrize("scores, row, text", [
    ([1.0, float("nan"), 2.0], 1, "row 1 returned nan"),
    ([1.0, 2.0, float("inf")], 2, "row 2 returned inf"),
    (np.array([1.0, -np.inf, 0.0]), 1, "row 1 returned -inf"),
    ([1.0, "2.0", 3.0], 1, "row 1 returned a non-numeric str '2.0'"),
    ([None, 1.0, 2.0], 0, "row 0 returned a non-numeric NoneType None"),
])
def test_check_scores_bad_values_name_reward_and_row(scores, row, text):
    prompts = ["first prompt", "second prompt " + "x" * 100, "third prompt"]
    with pytest.raises(RewardError) as err:
        check_scores("myreward", scores, 3, prompts)
    assert err.value.reward == "myreward" and err.value.row == row
    assert str(err.value).startswith(f"reward 'myreward': {text} (prompt: ")
    assert repr(prompts[row][:60]) in str(err.value)


@pytest.mark.parametrize("scores, text", [
    ([1.0, 2.0], "returned 2 scores for 3 responses"),
    ([1.0] * 4, "returned 4 scores for 3 responses"),
    (np.zeros((3, 1)), "array of shape (3, 1)"),
    (0.5, "returned float"),
    ({"a": 1.0}, "returned dict"),
])
def test_check_scores_wrong_shape(scores, text):
    with pytest.raises(RewardError, match=r"^reward 'r': ") as err:
        check_scores("r", scores, 3)
    assert text in str(err.value) and err.value.row is None


def test_call_reward_wraps_exception_with_cause():
    def broken(prompts, responses, **info):
        raise KeyError("missing-field")

    with pytest.raises(RewardError) as err:
        call_reward("broken", broken, ["p"], ["r"])
    assert str(err.value) == "reward 'broken': raised KeyError: 'missing-field'"
    assert isinstance(err.value.__cause__, KeyError) and err.value.row is None


def test_call_reward_validates_after_calling():
    with pytest.raises(RewardError, match=r"reward 'halfnan': row 1 returned nan \(prompt: 'q'\)"):
        call_reward("halfnan", lambda p, r, **i: [0.0, math.nan], ["p", "q"], ["a", "b"])


def test_call_reward_timeout_in_worker_thread():
    release = threading.Event()

    def sleepy(prompts, responses, **info):
        release.wait(5)
        return [1.0] * len(responses)

    start = time.monotonic()
    with pytest.raises(RewardError) as err:
        call_reward("sleepy", sleepy, ["p"], ["r"], timeout=0.2)
    release.set()
    assert time.monotonic() - start < 1.5
    assert str(err.value) == "reward 'sleepy': timed out after 0.2s" and err.value.row is None


def test_call_reward_with_timeout_returns_scores_and_propagates_errors():
    assert call_reward("fast", lambda p, r, **i: [3.0], ["p"], ["r"], timeout=5) == [3.0]

    def broken(prompts, responses):
        raise ValueError("bad input")

    with pytest.raises(RewardError, match=r"^reward 'b': raised ValueError: bad input$") as err:
        call_reward("b", broken, ["p"], ["r"], timeout=5)
    assert isinstance(err.value.__cause__, ValueError)


def test_call_reward_passes_only_the_info_a_reward_names():
    seen = {}

    def wants_ids(prompts, responses, response_ids=None):
        seen["ids"] = response_ids
        return [float(len(ids)) for ids in response_ids]

    info = {"response_ids": [[5, 6, 7], [8]], "prompt_ids": [[1], [2]], "tokenizer": object()}
    assert call_reward("ids", wants_ids, ["p", "q"], ["a", "b"], **info) == [3.0, 1.0]
    assert call_reward("plain", lambda prompts, responses: [1.0, 2.0], ["p", "q"], ["a", "b"],
                       **info) == [1.0, 2.0]


def test_reward_error_pickles():
    err = pickle.loads(pickle.dumps(RewardError("len", "returned nan", 3, "prompt")))
    assert (err.reward, err.row, str(err)) == ("len", 3, "reward 'len': row 3 returned nan "
                                                         "(prompt: 'prompt')")


# --- registry routes ------------------------------------------------------------------------

def test_short_name_builds_builtin():
    reward = build_reward({"name": "length", "args": {"target": 2}})
    assert isinstance(reward, CompositeReward)
    assert reward.names == ["length"] and reward.weights == [1.0]
    result = reward(["p", "q"], ["one two", "one two three four"])
    assert isinstance(result, RewardResult)
    assert result.total == [0.0, -1.0] and result.components == {"length": [0.0, -1.0]}


def test_plain_string_spec():
    reward = build_reward("sentiment")
    assert reward.names == ["sentiment"]
    assert reward(["p"], ["I love it"]).total[0] > 0.5


def test_dotted_path_function(fixture_rewards):
    reward = build_reward(f"{MOD}:char_count")
    assert reward.names == [f"{MOD}:char_count"]
    assert reward(["p", "q"], ["abc", "hello!"], tokenizer=object()).total == [3.0, 6.0]


def test_dotted_path_function_with_args_binds_them(fixture_rewards):
    reward = build_reward({"name": f"{MOD}:scaled_words", "args": {"factor": 0.5}})
    # scaled_words takes no **info: the tokenizer must not be passed to it.
    assert reward(["p", "q"], ["a b c", "a"], tokenizer=object()).total == [1.5, 0.5]


def test_dotted_path_class_instantiated_with_args(fixture_rewards):
    reward = build_reward({"name": f"{MOD}:Shift", "args": {"offset": -1.0, "per_char": 0.25}})
    assert reward(["p", "q"], ["abcd", ""]).total == [0.0, -1.0]


def test_class_receives_context_when_it_asks(fixture_rewards):
    reward = build_reward(f"{MOD}:FromContext", context={"value": 7.5})
    assert reward(["p"], ["r"]).total == [7.5]


def test_callable_spec():
    def double_len(prompts, responses):
        return [2.0 * len(r) for r in responses]

    reward = build_reward([double_len, {"name": double_len, "weight": 0.5}])
    assert reward.names == ["double_len", "double_len_2"]
    assert reward(["p"], ["abc"]).total == [9.0]


@pytest.mark.parametrize("name, text", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz' of dotted path "
                             "'no_such_module_xyz:f': ModuleNotFoundError"),
    (f"{MOD}:missing", f"dotted path '{MOD}:missing': module '{MOD}' has no attribute "
                       "'missing'"),
    (f"{MOD}:NOT_CALLABLE", f"'{MOD}:NOT_CALLABLE' resolved to a non-callable int"),
    (f"{MOD}:", "must look like 'package.module:attr'"),
])
def test_dotted_path_errors_name_the_path(fixture_rewards, name, text):
    with pytest.raises(RewardError) as err:
        build_reward(name)
    assert err.value.reward == name and text in str(err.value)


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A real distribution on sys.path registering `shout` in the rlhf.rewards group."""
    dist = tmp_path / "myplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[rlhf.rewards]\nshout = myplugin_mod:shout_reward\nshout_class = myplugin_mod:Exclaim\n")
    (tmp_path / "myplugin_mod.py").write_text(textwrap.dedent("""
        def shout_reward(prompts, responses, **info):
            return [float(sum(c.isupper() for c in r)) for r in responses]

        class Exclaim:
            def __init__(self, bonus=1.0):
                self.bonus = bonus

            def __call__(self, prompts, responses, **info):
                return [self.bonus * r.count("!") for r in responses]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("myplugin_mod", None)


def test_entry_point_found_through_metadata(installed_plugin):
    reward = build_reward("shout")
    assert reward.names == ["shout"]
    assert reward(["p", "q"], ["HeLLo", "quiet"]).total == [3.0, 0.0]
    exclaim = build_reward({"name": "shout_class", "args": {"bonus": 2.0}})
    assert exclaim(["p"], ["wow!!"]).total == [4.0]
    assert known_rewards()["shout"] == "entry point: myplugin_mod:shout_reward from myplugin"


def test_unknown_name_lists_known_rewards(installed_plugin):
    with pytest.raises(RewardError) as err:
        build_reward("sentimnet")
    message = str(err.value)
    assert message.startswith("reward 'sentimnet': unknown reward name.")
    for name in [*BUILTINS, "composite", "shout", "shout_class"]:
        assert name in message
    assert "'package.module:function'" in message and "rlhf.rewards" in message


def test_unknown_dotted_looking_name_suggests_colon():
    with pytest.raises(RewardError, match="Did you mean the dotted path 'my.pkg:fn'"):
        build_reward("my.pkg.fn")


def test_known_rewards_lists_builtins():
    known = known_rewards()
    assert set(BUILTINS) | {"composite"} <= set(known)
    assert known["length"].startswith("built-in: Closeness of the response length")


@pytest.mark.parametrize("spec, text", [
    ({"name": "length", "args": {"target": 2}, "wieght": 2}, "unknown spec keys ['wieght']"),
    ({"name": "length", "args": {"target": 2}, "weight": "2"}, "weight must be a finite number"),
    ({"name": "length", "args": {"target": 2}, "weight": math.nan}, "weight must be a finite"),
    ({"name": "length", "args": {"tarrget": 2}}, "unexpected keyword argument 'tarrget'"),
    ({"name": "length", "args": {"target": 2}, "normalize": {"kind": "zscore"}},
     "normalize.kind must be 'running' or 'none'"),
    ({"name": "length", "args": {"target": 2}, "normalize": {"kind": "running", "clip": -1}},
     "clip must be a positive number"),
    ({"name": "length", "args": {"target": 2}, "timeout": 0}, "timeout must be a positive"),
    ({"name": "length", "args": [2]}, "args must be a mapping"),
    ([], "empty list"),
    ([{"name": "sentiment", "id": "s"}, {"name": "length", "args": {"target": 1}, "id": "s"}],
     "two components share this id"),
    ({"name": "composite", "args": {"components": [{"name": "composite", "args": {
        "components": ["sentiment"]}}]}}, "cannot be a component of another composite"),
    ({"name": "composite", "weight": 2, "args": {"components": ["sentiment"]}},
     "weights, normalize and ids go on the components"),
])
def test_bad_specs(spec, text):
    with pytest.raises(RewardError) as err:
        build_reward(spec)
    assert text in str(err.value)


# --- built-ins ------------------------------------------------------------------------------

def test_sentiment_values():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["I love this, it is wonderful and amazing!", "This is terrible, I hate it.",
             "The meeting is on Tuesday at noon, but the room is awful."]
    scores = build_reward("sentiment")(["p"] * 3, texts).components["sentiment"]
    assert scores[0] == pytest.approx(0.9184) and scores[0] > 0.5
    assert scores[1] == pytest.approx(-0.7783) and scores[1] < -0.5
    assert scores[2] == SentimentIntensityAnalyzer().polarity_scores(texts[2])["compound"]


def test_length_words_exact():
    reward = build_reward({"name": "length", "args": {"target": 4}})
    # words: 4, 1, 8, 0 -> -|n - 4| / 4
    scores = reward(["p"] * 4, ["a b c d", "a", "a b c d e f g h", ""]).total
    assert scores == [0.0, -0.75, -1.0, -1.0]
    scaled = build_reward({"name": "length", "args": {"target": 4, "scale": 2}})
    assert scaled(["p", "q"], ["a b", "a  b\nc d e f"]).total == [-1.0, -1.0]


def test_length_tokens_from_ids_and_tokenizer():
    reward = build_reward({"name": "length", "args": {"target": 3, "unit": "tokens"}})
    ids = [[11, 12, 13], [11, 12, 13, 14, 15, 16], [7]]
    assert reward(["p"] * 3, ["x", "y", "z"], response_ids=ids).total == \
        [0.0, -1.0, pytest.approx(-2 / 3)]
    tok = _tiny_tokenizer()
    # Whitespace pre-tokenizer splits punctuation: "hello, world!" is 4 tokens, 2 words.
    assert reward(["p", "q"], ["hello, world!", "good"], tokenizer=tok).total == \
        [pytest.approx(-1 / 3), pytest.approx(-2 / 3)]


def test_length_tokens_without_ids_is_a_clear_error():
    reward = build_reward({"name": "length", "args": {"target": 3, "unit": "tokens"}})
    with pytest.raises(RewardError, match=r"reward 'length': raised ValueError: "
                                          r"unit='tokens' needs response_ids or a tokenizer"):
        reward(["p"], ["r"])


@pytest.mark.parametrize("args, text", [
    ({"target": -1}, "target must be a non-negative integer"),
    ({"target": 0}, "scale must be positive"),
    ({"target": 2, "unit": "chars"}, "unit must be 'words' or 'tokens'"),
])
def test_length_bad_args(args, text):
    with pytest.raises(RewardError, match="cannot build it") as err:
        build_reward({"name": "length", "args": args})
    assert text in str(err.value)


def test_regex_sums_weights_of_found_patterns():
    reward = build_reward({"name": "regex", "args": {
        "patterns": {r"\bthanks?\b": 1.5, r"\d+": -0.5, r"^Sure": 2.0}}})
    responses = ["Sure, thanks: 42 and 7", "sure thank you", "THANKS", "nothing here"]
    # Presence per pattern (re.search), case-sensitive by default.
    assert reward(["p"] * 4, responses).total == [3.0, 1.5, 0.0, 0.0]
    ci = build_reward({"name": "regex", "args": {"patterns": [r"^sure", "thanks"], "flags": "i"}})
    assert ci(["p"] * 4, responses).total == [2.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("args, text", [
    ({"patterns": ["("]}, "invalid regex '('"),
    ({"patterns": ["a"], "flags": "iz"}, "unknown regex flags ['z']"),
    ({"patterns": {"a": "high"}}, "patterns['a'] must be a finite number"),
    ({"patterns": "abc"}, "patterns must be a mapping"),
    ({"patterns": []}, "patterns is empty"),
])
def test_regex_bad_args(args, text):
    with pytest.raises(RewardError) as err:
        build_reward({"name": "regex", "args": args})
    assert text in str(err.value)


def test_keyword_presence_case_and_whole_word():
    responses = ["The Cat sat on the cat mat", "category of cats", "I like C++ and cat.",
                 "THANK YOU, thank you"]
    default = build_reward({"name": "keyword", "args": {
        "keywords": {"cat": 2.0, "c++": 0.5, "thank you": 1.0}}})
    # Presence not counts; case-insensitive; "cat" is not found inside "category"/"cats".
    assert default(["p"] * 4, responses).total == [2.0, 0.0, 2.5, 1.0]
    cased = build_reward({"name": "keyword", "args": {
        "keywords": ["Cat", "thank you"], "case_sensitive": True}})
    assert cased(["p"] * 4, responses).total == [1.0, 0.0, 0.0, 1.0]
    substring = build_reward({"name": "keyword", "args": {
        "keywords": {"cat": 2.0}, "whole_word": False}})
    assert substring(["p"] * 4, responses).total == [2.0, 2.0, 2.0, 0.0]


def test_reward_model_needs_host():
    with pytest.raises(RewardError) as err:
        build_reward({"name": "reward_model", "args": {"path": "runs/x/reward"}})
    message = str(err.value)
    assert message.startswith("reward 'reward_model': cannot build it")
    for text in ("needs the rlhf host", "`rlhf score`", "'runs/x/reward'", "load_reward_model"):
        assert text in message


def test_reward_model_delegates_to_host_loader():
    calls = []

    def load_reward_model(path, **args):
        calls.append((path, args))
        return lambda prompts, responses, response_ids: [float(len(i)) for i in response_ids]

    reward = build_reward({"name": "reward_model", "id": "rm",
                           "args": {"path": "runs/x/reward", "batch_size": 4}},
                          context={"load_reward_model": load_reward_model})
    assert calls == [("runs/x/reward", {"batch_size": 4})]
    result = reward(["p", "q"], ["a", "b"], response_ids=[[1, 2], [3]], tokenizer=None)
    assert result.components == {"rm": [2.0, 1.0]}


# --- composite and normalisation ------------------------------------------------------------

def test_composite_weighted_sum_by_hand():
    reward = build_reward([
        {"name": "keyword", "weight": 2.0, "args": {"keywords": {"good": 1.5, "dog": 0.5}}},
        {"name": "length", "weight": -0.5, "args": {"target": 2}},
        {"name": "length", "weight": 0.0, "args": {"target": 1, "scale": 1}},
    ])
    assert reward.names == ["keyword", "length", "length_2"]
    assert reward.weights == [2.0, -0.5, 0.0]
    result = reward(["p"] * 3, ["good cat", "good good dog", "bad"])
    assert result.components == {"keyword": [1.5, 2.0, 0.0], "length": [0.0, -0.5, -0.5],
                                 "length_2": [-1.0, -2.0, 0.0]}
    assert result.weighted == {"keyword": [3.0, 4.0, 0.0], "length": [-0.0, 0.25, 0.25],
                               "length_2": [-0.0, -0.0, 0.0]}
    assert result.total == [3.0, 4.25, 0.25]


def test_composite_dict_form_and_ids():
    reward = build_reward({"name": "composite", "args": {"components": [
        {"name": "keyword", "id": "polite", "args": {"keywords": ["please"]}},
        {"name": "keyword", "args": {"keywords": ["no"]}, "weight": -1},
        {"name": "keyword", "args": {"keywords": ["yes"]}},
    ]}})
    assert reward.names == ["polite", "keyword", "keyword_2"]
    result = reward(["p", "q"], ["yes please", "no"])
    assert result.total == [2.0, -1.0]
    assert result.components == {"polite": [1.0, 0.0], "keyword": [0.0, 1.0],
                                 "keyword_2": [1.0, 0.0]}


def test_composite_error_names_component_and_row(fixture_rewards):
    def nan_second(prompts, responses):
        return [0.0, math.nan]

    reward = build_reward(["sentiment", {"name": nan_second, "id": "flaky"}])
    with pytest.raises(RewardError) as err:
        reward(["a prompt", "the bad prompt"], ["fine", "fine"])
    assert (err.value.reward, err.value.row) == ("flaky", 1)
    assert str(err.value) == "reward 'flaky': row 1 returned nan (prompt: 'the bad prompt')"

    wrong_count = build_reward({"name": lambda p, r: [1.0], "id": "short"})
    with pytest.raises(RewardError, match="reward 'short': returned 1 scores for 2 responses"):
        wrong_count(["a", "b"], ["x", "y"])


def test_composite_timeout_from_spec():
    release = threading.Event()

    def hangs(prompts, responses):
        release.wait(5)
        return [0.0] * len(responses)

    reward = build_reward({"name": hangs, "id": "slow", "timeout": 0.2})
    with pytest.raises(RewardError, match=r"^reward 'slow': timed out after 0.2s$"):
        reward(["p"], ["r"])
    release.set()


def test_running_normalizer_welford_by_hand():
    norm = RunningNormalizer()
    # Batch [1, 3]: mean 2, population std 1.
    assert norm([1.0, 3.0]) == [-1.0, 1.0]
    assert (norm.count, norm.mean, norm.m2) == (2, 2.0, 2.0)
    # Seen [1, 3, 5]: mean 3, m2 8, std sqrt(8/3); (5 - 3) / sqrt(8/3) = sqrt(1.5).
    assert norm([5.0]) == [pytest.approx(math.sqrt(1.5), rel=1e-12)]
    assert (norm.count, norm.mean, norm.m2) == (3, 3.0, 8.0)
    # A single constant first batch normalises to 0, not a division by zero.
    assert RunningNormalizer()([4.0, 4.0]) == [0.0, 0.0]


def test_running_normalizer_matches_statistics_over_all_batches():
    batches = [[0.3, -1.2, 4.0], [2.5], [7.0, -3.0, 0.0, 1.1]]
    norm = RunningNormalizer()
    seen = []
    for batch in batches:
        seen += batch
        mean, std = statistics.fmean(seen), statistics.pstdev(seen)
        assert norm(batch) == pytest.approx([(x - mean) / std for x in batch], rel=1e-12)


def test_running_normalizer_clip_and_state_round_trip():
    norm = RunningNormalizer(clip=1.0)
    assert norm([0.0, 0.0, 0.0, 10.0]) == [pytest.approx(-1 / math.sqrt(3)),
                                           pytest.approx(-1 / math.sqrt(3)),
                                           pytest.approx(-1 / math.sqrt(3)), 1.0]
    restored = RunningNormalizer(clip=1.0)
    restored.load_state_dict(pickle.loads(pickle.dumps(norm.state_dict())))
    assert restored([2.0, 3.0]) == norm([2.0, 3.0])
    assert restored.state_dict() == norm.state_dict() == {
        "count": 6, "mean": 2.5, "m2": 75.5}  # sum(x^2)=113, 113 - 6 * 2.5^2
    with pytest.raises(KeyError, match="lacks"):
        RunningNormalizer().load_state_dict({"count": 1})


def test_composite_normalizes_then_weights_and_checkpoints():
    spec = [{"name": "keyword", "weight": 2.0, "normalize": {"kind": "running"},
             "args": {"keywords": {"good": 1.5, "dog": 0.5}}},
            {"name": "length", "weight": 1.0, "normalize": {"kind": "none"},
             "args": {"target": 2}}]
    reward = build_reward(spec)
    first = reward(["p"] * 3, ["good cat", "good good dog", "bad"])
    raw = [1.5, 2.0, 0.0]
    mean = 3.5 / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in raw) / 3)
    assert first.components["keyword"] == raw
    assert first.weighted["keyword"] == pytest.approx([2 * (x - mean) / std for x in raw])
    assert first.total == pytest.approx([2 * (x - mean) / std + ln
                                         for x, ln in zip(raw, [0.0, -0.5, -0.5])])
    state = reward.state_dict()
    assert list(state) == ["keyword"] and state["keyword"]["count"] == 3

    resumed = build_reward(spec)
    resumed.load_state_dict(state)
    batch = (["p", "q"], ["dog", "good"])
    assert resumed(*batch).total == reward(*batch).total
    with pytest.raises(KeyError, match="normalizes"):
        resumed.load_state_dict({})


def test_reward_package_never_imports_pipeline():
    import ast

    for path in (Path(__file__).parents[1] / "reward").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            assert not any(n.split(".")[0] == "pipeline" for n in names), (path, names)


# --- classifier -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A random 2-layer LlamaForSequenceClassification and its tokenizer, saved to disk."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = _tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, num_labels=3,
                         id2label={0: "neg", 1: "neu", 2: "pos"},
                         label2id={"neg": 0, "neu": 1, "pos": 2})
    model = LlamaForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def _direct_logits(model, tok, texts):
    """Logits row by row, without padding: the reference the batched reward must match."""
    with torch.no_grad():
        return torch.cat([model(**tok(t, return_tensors="pt",
                                      return_token_type_ids=False)).logits for t in texts])


CLS_RESPONSES = ["i love it", "the food was awful !", "hello", "this movie is great and good"]
CLS_PROMPTS = ["hello", "was it good ?", "hello world", "the movie"]


def test_classifier_prob_of_default_and_named_label(tiny_classifier):
    path, model, tok = tiny_classifier
    probs = torch.softmax(_direct_logits(model, tok, CLS_RESPONSES), dim=-1)
    default = build_reward({"name": "classifier", "args": {"model": str(path), "batch_size": 3}})
    scores = default(["p"] * 4, CLS_RESPONSES).total
    assert scores == pytest.approx(probs[:, 1].tolist(), abs=1e-5)
    named = build_reward({"name": "classifier", "args": {"model": str(path), "label": "pos"}})
    assert named(["p"] * 4, CLS_RESPONSES).total == pytest.approx(probs[:, 2].tolist(), abs=1e-5)


def test_classifier_logit_output_and_prompt_response(tiny_classifier):
    path, model, tok = tiny_classifier
    logits = _direct_logits(model, tok, CLS_RESPONSES)
    reward = build_reward({"name": "classifier", "args": {
        "model": str(path), "label": 0, "output": "logit", "batch_size": 2}})
    assert reward(["p"] * 4, CLS_RESPONSES).total == pytest.approx(logits[:, 0].tolist(),
                                                                   abs=1e-5)
    paired = build_reward({"name": "classifier", "args": {
        "model": str(path), "label": "neg", "output": "logit", "text": "prompt_response"}})
    with torch.no_grad():
        expected = [model(**tok(p, r, return_tensors="pt", return_token_type_ids=False)
                          ).logits[0, 0].item() for p, r in zip(CLS_PROMPTS, CLS_RESPONSES)]
    assert paired(CLS_PROMPTS, CLS_RESPONSES).total == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("args, text", [
    ({"label": "happy"}, "unknown label 'happy'; the model's labels are 0=neg, 1=neu, 2=pos"),
    ({"label": 3}, "label index 3 is out of range"),
    ({"output": "probability"}, "output must be 'prob' or 'logit'"),
])
def test_classifier_bad_args(tiny_classifier, args, text):
    path, _, _ = tiny_classifier
    with pytest.raises(RewardError) as err:
        build_reward({"name": "classifier", "args": {"model": str(path), **args}})
    assert text in str(err.value)

