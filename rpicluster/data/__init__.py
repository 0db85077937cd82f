"""rpicluster.data"""
