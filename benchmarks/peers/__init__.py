"""The opponents of ``benchmarks/vs_peers.py``, one module each behind one interface
(:class:`peers.base.Opponent`): ``intervene_search`` (intervene's own search, in process), ``heretic``,
``abliterix`` and ``senbonzakura`` (each a child process from its own venv, driven offline on local prompt
files). ``records`` holds the typed results and the JSON / text / Markdown they become, ``judge`` the one
judge every front member meets on the eval split, ``tensors`` the edited-tensor diff of a saved checkpoint
against the model it came from, ``menu`` the stdin driver of the notebook-mode menus heretic and abliterix
share. benchmarks/ is not a package: ``vs_peers.py`` puts this folder's parent on ``sys.path``.
"""
