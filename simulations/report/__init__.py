"""The experiment report: ``metrics.json`` (long table), CSVs, PNG figures and ``report.html``.

``tables`` (the long table, summaries, the console table), ``figures`` (matplotlib), ``files``
(JSON, CSV, environment) and ``html`` (the page, and ``write_report``, which writes everything).
Optional sections are data (``sections``) built by their own modules: ``gan_section`` (SNGAN sample
quality, memorisation, picture grid) and ``expansion_section`` (the expansion head beside volume and
the marker-count score).
"""
