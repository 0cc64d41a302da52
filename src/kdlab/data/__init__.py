"""kdlab.data"""
