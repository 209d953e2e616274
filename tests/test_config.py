"""The schema's range checks: every key they name exists, and a value out of range is one
ConfigError that names the key (a check that silently skipped a key would fail here)."""
import pytest

from dasm.config import FRACTIONS, NON_NEGATIVE, POSITIVE, Config
from dasm.errors import ConfigError
from dasm.plan import LACK_KEYS


def _out_of_range(key):
    if key in FRACTIONS:
        return [1.0, -0.1]
    return [-1] if key in NON_NEGATIVE else [0, -1]


@pytest.mark.parametrize("key", POSITIVE + NON_NEGATIVE + FRACTIONS)
def test_range_checks_name_the_key(key):
    Config().replace(**{key: 0 if key in NON_NEGATIVE + FRACTIONS else 1})  # the edge is allowed
    for bad in _out_of_range(key):
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            Config().replace(**{key: bad})


@pytest.mark.parametrize("key,bad", [("match.mom_img", 1.0), ("match.net_cutmix", 1.5),
                                     ("eval.cutmix", -0.5), ("match.lr_img", 0.0),
                                     ("match.lr_img", "fast"), ("data.channels", 2),
                                     ("model.depth", 0), ("model.depth", "deep"),
                                     ("seed", -1)])
def test_other_ranges_name_the_key(key, bad):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        Config().replace(**{key: bad})


def test_per_segment_fraction_lists_are_checked_item_by_item():
    Config().replace(**{"dasm.easy_drop": [0.0, 0.5]})
    with pytest.raises(ConfigError, match="dasm.easy_drop' must lie in \\[0, 1\\), got 1.5"):
        Config().replace(**{"dasm.easy_drop": [0.0, 1.5]})


@pytest.mark.parametrize("key,value", [("lack_margin", 0.5), ("tail_drop", 0.1),
                                       ("coverage", 0.5), ("lack_fill", "margin")])
def test_lack_keys_under_a_rank_pool_are_refused(key, value):
    assert key in LACK_KEYS
    for pool in ("lack", "auto"):  # read there (auto: at large phi)
        Config().replace(**{"dasm.pool": pool, f"dasm.{key}": value})
    with pytest.raises(ConfigError, match=f"config key 'dasm.{key}' shapes lack pools"):
        Config().replace(**{"dasm.pool": "rank", f"dasm.{key}": value})
    Config().replace(**{"dasm.pool": "rank"})  # at their defaults they are fine


def test_where_the_data_lies_is_not_part_of_an_identity():
    """data.root and data.download say where the data is, not what it is: a run resumes and a
    teacher is found from another root; what the data is (its name, subset) still counts."""
    from dasm import teacher

    cfg = Config()
    moved = cfg.replace(**{"data.root": "/mnt/elsewhere", "data.download": True})
    assert moved.identity() == cfg.identity() and moved.differences(cfg) == []
    assert teacher.protocol_key(teacher.teacher_config(moved)) == \
        teacher.protocol_key(teacher.teacher_config(cfg))
    other = cfg.replace(**{"data.train_per_class": 300})
    assert other.identity() != cfg.identity()
    assert teacher.protocol_key(teacher.teacher_config(other)) != \
        teacher.protocol_key(teacher.teacher_config(cfg))
