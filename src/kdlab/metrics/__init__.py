"""kdlab.metrics"""
