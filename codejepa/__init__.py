"""codejepa: latent code prediction, from real repositories to honest retrieval.

The stages install as sub-packages: ``codejepa.corpus`` → ``codejepa.embed`` →
``codejepa.predict`` → ``codejepa.evaluate``. A stage imports only from the stages before it;
helpers that several stages share live in :mod:`codejepa.core` and :mod:`codejepa.progress`
(the commands' progress bars), which import no stage.
"""

__version__ = "0.1.0"
