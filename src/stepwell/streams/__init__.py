"""eKuiper-style streams and rules (DESIGN section 6, ``plugin``).

``parser`` reads stream and rule JSON and compiles rule SQL for DuckDB,
``windows`` cuts events into window panes, ``rules`` runs rules
(:class:`RuleEngine` is the API the CLI and ``stepwell serve`` use).
"""

from stepwell.streams.parser import RuleDef, StreamDef, StreamError
from stepwell.streams.rules import RuleEngine, RuleError

__all__ = ["RuleDef", "RuleEngine", "RuleError", "StreamDef", "StreamError"]
