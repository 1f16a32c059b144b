"""The seed papers' tasks as lmppl programs (like NumPyro's ``examples/``).

Each factory returns a :class:`lmppl.task.Task`: the program, its arguments and its exact
target sampler. Offline defaults use stories260K; every factory takes the paper's models
and classifiers by name when the Hugging Face hub is reachable.

=====================  ====================================================  ==========
name                   target σ(s) ∝ p0(s) φ(s)                              exact
=====================  ====================================================  ==========
toxicity-threshold     φ = 1[toxicity score < −5] + 1e-16, T = 10            rejection
toxicity-classifier    φ = p(toxic | s), T = 20                              rejection
sentiment              φ = p(strongly negative | "I bought this" + s), T=10  rejection
infilling              φ = p0(ending | s), T = 15, c = 10                    joint
infilling-small        φ = p0(ending | s), T = 2, c = 1                      joint
infilling-fixed        φ = p0(" a little g" | s), T = 4 (one fixed ending)    rejection
=====================  ====================================================  ==========
"""

from models import infilling, sentiment, toxicity

__all__ = ["TASKS", "infilling", "sentiment", "toxicity"]

#: Task name → factory (keyword options → :class:`lmppl.task.Task`).
TASKS = {
    "toxicity-threshold": toxicity.threshold,
    "toxicity-classifier": toxicity.classifier,
    "sentiment": sentiment.sentiment,
    "infilling": infilling.infilling,
    "infilling-small": infilling.infilling_small,
    "infilling-fixed": infilling.infilling_fixed,
}
