"""A host scorer that raises inside the compiled sweep surfaces as itself (issue #15, 7)."""

import jax
import numpyro
import pytest

import lmppl
from lmppl import potentials
from lmppl.cli import main

LM = lmppl.table_lm(3, context_length=12, seed=1)


class ScorerOffline(RuntimeError):
    pass


def failing_scorer(texts):
    raise ScorerOffline(f"the scorer is offline ({len(texts)} texts)")


def program():
    s = numpyro.sample("s", lmppl.LM(LM, prompt="a", max_new_tokens=2, stop_at_eos=False))
    numpyro.factor("score", potentials.text(failing_scorer, LM.tokenizer)(s))


@pytest.mark.parametrize("call", ["run", "log_marginals", "exact"])
def test_the_users_exception_comes_back_with_its_type_and_message(call):
    with pytest.raises(ScorerOffline, match="the scorer is offline") as error:
        if call == "run":
            lmppl.infer.SMC(program, 8).run(jax.random.key(0))
        elif call == "log_marginals":
            lmppl.infer.SMC(program, 8).log_marginals(jax.random.key(0), 2)
        else:
            lmppl.infer.Exact(program).run(None)
    assert "INTERNAL" not in str(error.value)


def test_the_cli_prints_one_line(capsys):
    code = main(["sample", f"{__file__}:program", "--particles", "4"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "ScorerOffline: the scorer is offline" in lines[0], err
