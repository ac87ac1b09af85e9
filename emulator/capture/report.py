def write_report(d, rows): pass
