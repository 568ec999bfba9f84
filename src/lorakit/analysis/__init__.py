"""What an adapter did to a model, and plots of it (plus the X-LoRA and training-curve plots).

    from lorakit.analysis import analyze, write_report, mitigate_intruders
    report = analyze("runs/date")                       # spectra, intruders, per module (JSON-ready dict)
    write_report(report, "runs/date-analysis")          # analysis.json, report.md, PNG plots
    mitigate_intruders("runs/date", "runs/date-mitigated", scale=0.75)

The same from the command line: ``lorakit analyze runs/date [--against OTHER] [--mitigate 0.75
--mitigated-out DIR]``.
"""

from lorakit.analysis.analyze import IntruderSettings, analyze, intruder_count
from lorakit.analysis.mitigation import MitigationReport, mitigate_intruders
from lorakit.analysis.report_files import load_report, write_report

__all__ = ["IntruderSettings", "MitigationReport", "analyze", "intruder_count", "load_report", "mitigate_intruders",
           "write_report"]
