def compare(a,b): pass
class CompareResult: pass
