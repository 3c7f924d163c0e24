"""The one vocabulary of compression methods (CLI, Slicer Logic) and the policies it names."""
from __future__ import annotations

import pytest

from TuckerSegmentLib import BudgetPolicy, EnergyPolicy, UniformPolicy, VBMFPolicy, policy_for, policy_from_dict
from TuckerSegmentLib.errors import PolicyError
from TuckerSegmentLib.policies.methods import DEFAULT_METHOD, METHODS, method


def test_each_method_makes_its_policy_with_the_target_given_or_its_default():
    made = {m.key: policy_for(m.key, 0.3 if m.target else None, device="cpu", rank_min=4) for m in METHODS if not m.prunes}
    assert made["flops"].params() == BudgetPolicy(target_flops=0.3).params()
    assert made["params"].params() == BudgetPolicy(target_params=0.3).params()
    assert made["latency"].params() == BudgetPolicy(target_latency=0.3, device="cpu").params()
    assert made["uniform"].params() == {"factor": 0.3, "rank_min": 4}
    assert made["energy"].params() == {"keep": 0.3}
    assert isinstance(made["vbmf"], VBMFPolicy)
    assert policy_for().params() == BudgetPolicy(target_flops=0.5).params() and DEFAULT_METHOD == "flops"
    assert policy_for("energy").params() == EnergyPolicy(0.95).params()
    for policy in made.values():  # what tucker.json records rebuilds the same policy
        assert repr(policy_from_dict(policy.to_dict())) == repr(policy)
    assert isinstance(policy_from_dict(UniformPolicy(0.5).to_dict()), UniformPolicy)


def test_bad_methods_and_targets_are_refused_with_the_fix():
    with pytest.raises(PolicyError, match="unknown compression method 'budget'; choose one of flops, params, latency, "
                                          "uniform, energy, vbmf, prune-l1, prune-fpgm, prune-taylor"):
        method("budget")
    with pytest.raises(PolicyError, match="the uniform method needs a target: the fraction of channels"):
        policy_for("uniform")
    with pytest.raises(PolicyError, match="vbmf method chooses its ranks itself"):
        policy_for("vbmf", 0.5)
    for key, target in (("flops", 0.0), ("params", 1.5), ("latency", -1.0), ("uniform", 2.0), ("energy", 0.0)):
        with pytest.raises(PolicyError, match=r"\(0, 1\]"):
            policy_for(key, target)
    with pytest.raises(PolicyError, match="unknown rank policy 'nope'; known policies: budget, energy, uniform, vbmf"):
        policy_from_dict({"name": "nope"})
