"""``python -m xaiadv`` runs the command-line interface."""

from xaiadv.evaluation.cli import main

raise SystemExit(main())
