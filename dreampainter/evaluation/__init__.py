"""dreampainter.evaluation"""
