"""kdlab.models"""
