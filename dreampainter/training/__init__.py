"""dreampainter.training"""
