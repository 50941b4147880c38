"""dreampainter.data"""
