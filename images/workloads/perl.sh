# A perl program (real shared software from the host) building and
# reworking an in-memory word index.
perl -e '
    my %index;
    my $round = 0;
    while (1) {
        for my $i (1 .. 60000) {
            my $word = join "", map { chr(97 + ($i * $_ + $round) % 26) } 1 .. 6;
            push @{ $index{$word} }, $i;
        }
        my $total = 0;
        $total += scalar @{ $index{$_} } for keys %index;
        %index = () if ++$round % 4 == 0;
        select(undef, undef, undef, 0.2);
    }
'
