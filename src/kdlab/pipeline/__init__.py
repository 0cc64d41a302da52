"""kdlab.pipeline"""
