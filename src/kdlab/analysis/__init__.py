"""kdlab.analysis"""
