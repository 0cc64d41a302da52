"""kdlab.report"""
