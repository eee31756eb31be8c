# The perl workload: a word index over generated text, rebuilt every few
# rounds so its memory keeps changing.
use strict;
use warnings;

my %index;
my $round = 0;
while (1) {
    for my $i (1 .. 40000) {
        my $word = join "", map { chr(97 + ($i * $_ + $round * 7) % 26) } 1 .. 6;
        push @{ $index{$word} }, $i + $round * 40000;
    }
    my @popular = (sort { @{ $index{$b} } <=> @{ $index{$a} } } keys %index)[0 .. 9];
    my $line = join ",", map { "$_=" . scalar @{ $index{$_} } } grep { defined } @popular;
    %index = () if ++$round % 5 == 0;
    select(undef, undef, undef, 0.1);
}
