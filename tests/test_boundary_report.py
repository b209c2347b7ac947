"""eval_bpb's boundary statistics against a router whose cuts we choose."""
from types import SimpleNamespace

import torch

import eval_bpb
from conftest import study02, tiny_hparams

TEXT = ("We are fifteen years into this new century, and the state of our union is strong. " * 20).encode()


class FixedRouter:
    """Stands in for a model: cuts wherever `rule(tokens)` says."""

    def __init__(self, rule):
        self.rule = rule

    def eval(self):
        return self

    def __call__(self, x, y):
        return SimpleNamespace(boundary_mask=self.rule(x))


def test_word_start_cuts_score_one_and_shifted_cuts_are_recognised():
    t = study02()
    hp = tiny_hparams(t)  # byte260, sequence 64
    tokens = torch.tensor([1] + [b + 4 for b in TEXT])
    space = torch.zeros(260, dtype=torch.bool)
    space[ord(" ") + 4] = True

    def at_word_starts(x):
        prev = torch.cat((torch.ones_like(x[:, :1], dtype=torch.bool), space[x[:, :-1]]), dim=1)
        return prev & ~space[x]

    exact = eval_bpb.boundary_report(t, FixedRouter(at_word_starts), hp, tokens, torch.device("cpu"))
    assert exact["precision"] == 1.0 and exact["recall"] == 1.0
    assert exact["precision_shift_plus1"] == 0.0
    assert exact["example"].startswith("[are ][fifteen ][years ][into ][this ][new ][century, ][and ]")
    late = eval_bpb.boundary_report(t, FixedRouter(lambda x: torch.roll(at_word_starts(x), 1, dims=1)), hp,
                                    tokens, torch.device("cpu"))
    assert late["precision"] < 0.05 and late["precision_shift_plus1"] > 0.9
    words = len(TEXT.split())
    assert abs(exact["tokens_per_chunk"] - len(TEXT) / words) < 0.3
