"""The experiment report: ``metrics.json`` (long table), CSVs, PNG figures and ``report.html``.

``tables`` (the long table, summaries, the console table), ``figures`` (matplotlib), ``files``
(JSON, CSV, environment) and ``html`` (the page, and ``write_report``, which writes everything).
"""
